"""The frozen encoders around the denoiser, one file per model family behind one interface:

    encode_captions(captions) -> text conditioning dict      to_latents(images) -> x0
    to_images(x0, text=None, seed=0) -> images in [-1, 1]     pixel_size, latent_factor, identity
    weight_folders() -> the local folders its images depend on (what a cached base pool keys on)

    pixel.py              the demo (pixel space): demo_world's hash caption encoder; x0 is the image
    stable_diffusion.py   SD 1.x / 2.x / SDXL: CLIP text encoder(s) + tokenizer(s); x0 = VAE latents
    stable_cascade.py     Stable Cascade: CLIP bigG text; x0 = EfficientNet features (Stage C's
                          latents); to_images runs Stage B and Stage A (Paella) after Stage C

The family is chosen once, from the config (build_backbone); the step and the samplers read only
the conditioning dict. For the UNet families its keys are (leading batch dim):
    text_embedding          [N, L, D]    cross-attention context
    pooled_text_embedding   [N, P]       SDXL and Stable Cascade: the projected pooled text
    time_ids                [N, 6]       SDXL only: (orig H, W, crop top, left, target H, W)
"""
import jax

TEXT_KEYS = ("text_embedding", "pooled_text_embedding", "time_ids")


def unet_conditioning(text: dict) -> tuple[jax.Array, dict | None]:
  """A text-conditioning dict -> (encoder_hidden_states, added_cond or None) for the denoiser
  (PersonalizedUNet and PersonalizedCascade take the same call shape)."""
  if "pooled_text_embedding" not in text:
    return text["text_embedding"], None
  added = {"text_embeds": text["pooled_text_embedding"]}
  if "time_ids" in text:
    added["time_ids"] = text["time_ids"]
  return text["text_embedding"], added


def is_cascade(model_cfg) -> bool:
  return model_cfg.get("family", "unet") == "cascade"


def extra_text_keys(model_cfg) -> tuple[str, ...]:
  """Conditioning keys beyond text_embedding that the denoiser reads (batches carry them)."""
  if is_cascade(model_cfg):
    return ("pooled_text_embedding",)
  if model_cfg.get("addition_embed_type") == "text_time":
    return ("pooled_text_embedding", "time_ids")
  return ()


def build_backbone(config):
  """The run's backbone, chosen once from the config: Stable Cascade (model.family), Stable
  Diffusion (model.pretrained set), else the demo's pixel space."""
  if is_cascade(config.model):
    from ppd_jax.backbones import stable_cascade
    return stable_cascade.StableCascadeBackbone(config)
  if config.model.get("pretrained"):
    from ppd_jax.backbones import stable_diffusion
    return stable_diffusion.StableDiffusionBackbone(config)
  from ppd_jax.backbones import pixel
  return pixel.PixelBackbone(config)

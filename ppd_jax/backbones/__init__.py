"""The frozen encoders around the denoiser, one file per model family behind one interface:

    encode_captions(captions) -> text conditioning dict      to_latents(images) -> x0
    to_images(x0) -> images in [-1, 1]                        pixel_size, identity

    pixel.py              the demo (pixel space): demo_world's hash caption encoder; x0 is the image
    stable_diffusion.py   SD 1.x / 2.x / SDXL: CLIP text encoder(s) + tokenizer(s); x0 = VAE latents

The family is chosen once, from the config (build_backbone); the step and the samplers read only
the conditioning dict. For the UNet families its keys are (leading batch dim):
    text_embedding          [N, L, D]    cross-attention context
    pooled_text_embedding   [N, P]       SDXL only: pooled text for the add embedding
    time_ids                [N, 6]       SDXL only: (orig H, W, crop top, left, target H, W)
"""
import jax

TEXT_KEYS = ("text_embedding", "pooled_text_embedding", "time_ids")


def unet_conditioning(text: dict) -> tuple[jax.Array, dict | None]:
  """A text-conditioning dict -> (encoder_hidden_states, added_cond or None) for the UNet."""
  if "pooled_text_embedding" not in text:
    return text["text_embedding"], None
  return text["text_embedding"], {"text_embeds": text["pooled_text_embedding"],
                                  "time_ids": text["time_ids"]}


def build_backbone(config):
  """The run's backbone: Stable Diffusion when config.model.pretrained is set, else pixel space."""
  if config.model.get("pretrained"):
    from ppd_jax.backbones import stable_diffusion
    return stable_diffusion.StableDiffusionBackbone(config)
  from ppd_jax.backbones import pixel
  return pixel.PixelBackbone(config)

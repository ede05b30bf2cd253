"""Stable Cascade as a backbone (backbones/__init__.py's interface), from the hub's two folders
(weights/pretrained_cascade.py), all in JAX:

    captions -> CLIP ViT-bigG/14 text with the attention mask:
                text_embedding = hidden_states[-1] (before the final LayerNorm)  [N, 77, 1280]
                pooled_text_embedding = text_embeds                                [N, 1280]
                (the empty prompt is encoded, not zeroed: StableCascadePriorPipeline)
    images   -> x0 = EfficientNetV2-S features at sample_size x 32 px              [N, 24, 24, 16]
    x0       -> Stage B (StableCascadeUNet, DDPM-Wuerstchen, decoder_steps, CFG iff w > 1, as the
                decoder pipeline: 10 steps, w = 0) on a grid int(24 x 10.67) = 256, then Stage A
                (Paella decode, no quantisation) -> images [N, 1024, 1024, 3] in [-1, 1]
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ppd_jax.backbones.stable_diffusion import _chunked

EFFNET_STRIDE = 32   # EfficientNetV2-S's features: one latent cell per 32 x 32 pixels


class StableCascadeBackbone:
  """The frozen encoders around Stage C. The decoder folder (config.model.decoder) is opened on
  first use: training reads only precomputed latents and the text encoder."""

  def __init__(self, config, batch_size: int = 8):
    from ppd_jax.weights import pretrained_cascade
    m = config.model
    if not m.get("pretrained"):
      raise ValueError("config.model.pretrained: a Stable Cascade run needs the prior folder "
                       f"(default {pretrained_cascade.PRIOR_HUB}) for its text encoder")
    self._lib = pretrained_cascade
    self.prior = pretrained_cascade.open_prior(m.pretrained, m.prior_subfolder, m.variant)
    self._decoder_args = (m.get("decoder", ""), m.get("decoder_subfolder", "decoder_lite"),
                          m.variant)
    self.dtype = m.get("dtype", "float32")
    self.decoder_steps = int(m.get("decoder_steps", 10))
    self.decoder_guidance_scale = float(m.get("decoder_guidance_scale", 0.0))
    self.batch_size = batch_size
    self._compiled = set()   # Stage B's (rows, latent shape, report) run once: compiled
    self.latent_factor = EFFNET_STRIDE
    self.pixel_size = m.sample_size * EFFNET_STRIDE
    self.identity = ("cascade", self.prior.folder, self.prior.subfolder, self._decoder_args[0],
                     m.variant)

  def weight_folders(self) -> list[str]:
    """Stage C's folder, and the decoder's (Stage B and A make the images)."""
    return [self.prior.folder, self.decoder.folder]

  # --- text ---------------------------------------------------------------------------------

  @functools.cached_property
  def _text(self):
    module, params, tokenizer = self._lib.load_text_encoder(self.prior)
    fn = jax.jit(lambda ids, mask: module.apply({"params": params}, ids, mask))
    return fn, tokenizer

  def encode_captions(self, captions: list[str]) -> dict:
    """The prior pipeline's encode_prompt: padding to max_length, truncation, the mask."""
    fn, tokenizer = self._text
    length = min(tokenizer.model_max_length, self.prior.text.max_position_embeddings)
    tok = tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                    return_tensors="np")
    out = jax.device_get(fn(jnp.asarray(tok.input_ids, jnp.int32),
                            jnp.asarray(tok.attention_mask, jnp.int32)))
    return {"text_embedding": np.asarray(out["hidden_states"][-1], np.float32),
            "pooled_text_embedding": np.asarray(out["text_embeds"], np.float32)}

  # --- images -> Stage C latents ----------------------------------------------------------------

  @functools.cached_property
  def decoder(self):
    folder = self._decoder_args[0]
    if not folder:
      raise ValueError("config.model.decoder is empty: making Stage C latents or images needs "
                       f"the decoder folder (default {self._lib.DECODER_HUB})")
    return self._lib.open_decoder(*self._decoder_args)

  @functools.cached_property
  def latent_encoder(self):
    """(images_to_latents(variables, images), variables), jittable (precompute shards it)."""
    from ppd_jax.models import effnet
    module, variables = self._lib.load_effnet(self.decoder)
    size = self.pixel_size
    return (lambda v, x: effnet.images_to_latents(module, v, x, size)), variables

  @functools.cached_property
  def _effnet_fn(self):
    fn, variables = self.latent_encoder
    return jax.jit(lambda x: fn(variables, x))

  def to_latents(self, images: np.ndarray) -> np.ndarray:
    """[N, P, P, 3] in [-1, 1] -> x0 [N, P/32, P/32, 16] (P = sample_size x 32; deterministic)."""
    return _chunked(self._effnet_fn, np.asarray(images, np.float32), self.batch_size)

  # --- Stage C latents -> images ----------------------------------------------------------------

  @functools.cached_property
  def _stages(self):
    """(loop, decode, Stage B's channels), two compiled calls so that the host sees where
    Stage B ends and Stage A starts (diffusion/progress.py, notice_stage):
    loop(latents, pooled, null_pooled, x_T, key, noise, report) is Stage B's DDPM-Wuerstchen
    loop from x_T (per-step z from `key`, or `noise` [steps, *x_T.shape]; report: one
    progress.report_step per evaluation, which changes no number); decode(z) is Stage A's
    Paella decode -> images."""
    from ppd_jax.diffusion import cascade_sampler
    from ppd_jax.diffusion import progress
    from ppd_jax.models import paella
    stage_b, params_b = self._lib.load_stage_b(self.decoder, dtype=self.dtype)
    vqgan, vq_vars = self._lib.load_vqgan(self.decoder)
    steps, w = self.decoder_steps, self.decoder_guidance_scale
    cfg = cascade_sampler.guidance_enabled(w)

    def loop(latents, pooled, null_pooled, x_T, key, noise, report):
      def eps_fn(x, r, c):
        if report:
          progress.report_step()
        return stage_b.apply({"params": params_b}, x, r, c["pooled"][:, None],
                             effnet=c["effnet"])

      # The decoder pipeline's CFG (off at its default w = 0): uncond = zero effnet, the
      # empty prompt's pooled text.
      cond = {"effnet": latents, "pooled": pooled}
      uncond = {"effnet": jnp.zeros_like(latents),
                "pooled": jnp.broadcast_to(null_pooled, pooled.shape)}
      return cascade_sampler.sample(eps_fn, x_T, key, steps, w, cond, uncond, cfg=cfg,
                                    noise=noise)

    decode = jax.jit(lambda z: paella.latents_to_images(vqgan, vq_vars["params"], z))
    return (jax.jit(loop, static_argnames="report"), decode, stage_b.config.in_channels)

  def stage_b_shape(self, latents_shape) -> tuple[int, int, int]:
    """Stage B's latent grid for Stage C latents [.., h, w, 16]: int(h x 10.67), int(w x 10.67)."""
    h, w = latents_shape[-3:-1]
    scale = self.decoder.latent_dim_scale
    return int(h * scale), int(w * scale), self._stages[2]

  @functools.cached_property
  def _stage_b_fn(self):
    loop = self._stages[0]

    def run(latents, pooled, null_pooled, seeds, report):
      shape = self.stage_b_shape(latents.shape)
      keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(seeds)
      x_T = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
      return loop(latents, pooled, null_pooled, x_T, jax.random.fold_in(keys[0], 1), None,
                  report=report)

    return jax.jit(run, static_argnames="report")

  def decode_from_noise(self, latents: np.ndarray, text: dict, x_T: np.ndarray,
                        noise: np.ndarray) -> np.ndarray:
    """to_images with Stage B's x_T [N, *stage_b_shape] and per-step noise [steps, N, ...] given
    (no clip): to reproduce another implementation's draws exactly."""
    loop, decode, _ = self._stages
    z = loop(np.asarray(latents, np.float32),
             np.asarray(text["pooled_text_embedding"], np.float32), self._null_pooled,
             np.asarray(x_T, np.float32), None, np.asarray(noise, np.float32), report=False)
    return np.asarray(decode(z))

  @functools.cached_property
  def _null_pooled(self) -> np.ndarray:
    return self.encode_captions([""])["pooled_text_embedding"]

  def to_images(self, latents: np.ndarray, text: dict | None = None, seed: int = 0) -> np.ndarray:
    """Stage C latents [N, h, w, 16] -> images in [-1, 1] through Stage B and Stage A.

    text: the rows' conditioning (Stage B reads pooled_text_embedding; None: the empty
    prompt's). Stage B's x_T of row i depends on (seed, i) only; its per-step noise on the seed
    of the chunk's first row, so one call reproduces exactly."""
    latents = np.asarray(latents, np.float32)
    null = self._null_pooled
    pooled = (np.repeat(null, len(latents), axis=0) if text is None
              else np.asarray(text["pooled_text_embedding"], np.float32))
    out = []
    from ppd_jax.diffusion import progress   # pylint: disable=import-outside-toplevel
    report = progress.listening()
    _, decode, _ = self._stages
    for i in range(0, len(latents), self.batch_size):
      rows = slice(i, i + self.batch_size)
      seeds = ((seed * 1_000_003 + np.arange(len(latents))[rows]) % 2**31).astype(np.int32)
      shape = (len(seeds), *latents.shape[1:], report)
      progress.notice_stage("stage B", self.decoder_steps, shape not in self._compiled)
      z = self._stage_b_fn(latents[rows], pooled[rows], null, seeds, report=report)
      progress.notice_stage("decode", 1, shape not in self._compiled)   # Stage A
      out.append(np.asarray(decode(z)))
      self._compiled.add(shape)
    return np.clip(np.concatenate(out), -1.0, 1.0)

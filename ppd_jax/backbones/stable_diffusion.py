"""Stable Diffusion 1.x / 2.x / SDXL as a backbone (backbones/__init__.py's interface): the CLIP
text encoder(s) and the VAE of a diffusers folder (weights/pretrained.py), run in JAX."""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _chunked(fn, x: np.ndarray, size: int) -> np.ndarray:
  """fn over rows of x in padded chunks of `size` (one compiled shape)."""
  out = []
  for i in range(0, len(x), size):
    chunk = x[i:i + size]
    pad = size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(chunk))[:size - pad])
  return np.concatenate(out) if out else np.zeros((0,) + x.shape[1:], np.float32)


class StableDiffusionBackbone:
  """SD 1.x / 2.x / SDXL encoders from a diffusers folder (weights/pretrained.py), run in JAX.

  SD 1.x / 2.x condition on the last hidden state of their one encoder (after the final layer
  norm). SDXL concatenates the penultimate hidden states of both encoders (768 + 1280 = 2048) and
  adds the second encoder's projected pooled output and the image size as time_ids; its empty
  prompt is all zeros (force_zeros_for_empty_prompt). Latents are the VAE posterior mean, scaled
  (x0 = (mean - shift) * scale): deterministic, so precomputed data does not depend on a seed.
  """

  def __init__(self, config, batch_size: int = 16):
    from ppd_jax.weights import pretrained
    self.pipe = pretrained.open_pipeline(config.model.pretrained, config.model.variant)
    self.encoders = [pretrained.load_text_encoder(self.pipe, i)
                     for i in range(len(self.pipe.text_encoders))]
    self.vae, self.vae_params = pretrained.load_vae(
        self.pipe, attention_impl=config.model.get("attention_impl") or None)
    self.batch_size = batch_size
    self.pixel_size = config.model.sample_size * 2 ** (len(self.pipe.vae.block_out_channels) - 1)
    self.identity = ("sd", self.pipe.folder, self.pipe.variant)
    self.latent_factor = 2 ** (len(self.pipe.vae.block_out_channels) - 1)

  @functools.cached_property
  def _encode_fns(self):
    return [jax.jit(functools.partial(module.apply, {"params": params}))
            for _, module, params, _ in self.encoders]

  def _tokenize(self, tokenizer, captions: list[str], max_positions: int) -> np.ndarray:
    length = min(tokenizer.model_max_length, max_positions)
    ids = tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                    return_tensors="np").input_ids
    return np.asarray(ids, np.int32)

  def weight_folders(self) -> list[str]:
    return [self.pipe.folder]

  def encode_captions(self, captions: list[str]) -> dict:
    from ppd_jax.models import clip_text
    captions = list(captions)
    outs = []
    for (sub, module, _, tokenizer), fn in zip(self.encoders, self._encode_fns):
      ids = self._tokenize(tokenizer, captions, module.config.max_position_embeddings)
      outs.append(jax.device_get(fn(jnp.asarray(ids))))
    if self.pipe.kind == "sd":
      text = {"text_embedding": np.asarray(outs[0]["last_hidden_state"], np.float32)}
    else:
      hidden = np.concatenate([np.array(clip_text.penultimate(o), np.float32) for o in outs], -1)
      s = self.pixel_size
      text = {"text_embedding": hidden,
              "pooled_text_embedding": np.array(outs[-1]["text_embeds"], np.float32),
              "time_ids": np.tile(np.asarray([[s, s, 0, 0, s, s]], np.float32),
                                  (len(captions), 1))}
      if self.pipe.force_zeros_for_empty_prompt:
        empty = np.asarray([c == "" for c in captions])
        for key in ("text_embedding", "pooled_text_embedding"):
          text[key][empty] = 0.0
    return text

  @functools.cached_property
  def _vae_fns(self):
    from ppd_jax.models import vae as vae_lib
    encode = jax.jit(lambda x: vae_lib.images_to_latents(self.vae, self.vae_params, x))
    decode = jax.jit(lambda z: vae_lib.latents_to_images(self.vae, self.vae_params, z))
    return encode, decode

  @property
  def latent_encoder(self):
    """(images_to_latents(params, images), params), jittable: precompute shards it itself."""
    from ppd_jax.models import vae as vae_lib
    return (lambda p, x: vae_lib.images_to_latents(self.vae, p, x)), self.vae_params

  def to_latents(self, images: np.ndarray) -> np.ndarray:
    """[N, P, P, 3] images in [-1, 1] -> scaled latents [N, P/f, P/f, C]."""
    return _chunked(self._vae_fns[0], np.asarray(images, np.float32), self.batch_size)

  def to_images(self, latents: np.ndarray, text: dict | None = None, seed: int = 0) -> np.ndarray:
    """Scaled latents -> images in [-1, 1] (clipped); deterministic, the text is not read."""
    images = _chunked(self._vae_fns[1], np.asarray(latents, np.float32), self.batch_size)
    return np.clip(images, -1.0, 1.0)

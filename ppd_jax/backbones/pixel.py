"""The demo's backbone (backbones/__init__.py's interface): captions -> demo_world's hash text
encoder, and x0 is the image itself (pixel space, no VAE)."""
import numpy as np

from ppd_jax.demo_world import synthetic


class PixelBackbone:
  """Pixel-space models (the demo): demo_world/synthetic.py's hash caption encoder, no VAE."""

  def __init__(self, config):
    self.encoder = synthetic.make_text_encoder(config.model, config.data)
    self.pixel_size = config.model.sample_size
    self.identity = ("pixel", synthetic.TEXT_ENCODER_SEED)

  def encode_captions(self, captions: list[str]) -> dict:
    return {"text_embedding": self.encoder.encode(list(captions))}

  def to_latents(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32)

  latent_factor = 1   # pixels per latent cell
  latent_encoder = None   # x0 is the image

  def to_images(self, latents: np.ndarray, text: dict | None = None, seed: int = 0) -> np.ndarray:
    return np.asarray(latents, np.float32)

  def weight_folders(self) -> list[str]:
    return []   # no pretrained weights: the base is config.model.base

"""Image arrays in [-1, 1] (H, W, C) <-> PNG files (local paths or URLs, via ppd_jax.storage)."""
import io

import numpy as np
from PIL import Image

from ppd_jax import storage


def to_uint8(image: np.ndarray) -> np.ndarray:
  """[-1, 1] float -> [0, 255] uint8, clipping what lies outside."""
  return np.round((np.clip(np.asarray(image, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def save_png(image: np.ndarray, path) -> None:
  """Writes atomically (storage.write_bytes), so a killed run leaves no half-written PNG."""
  pixels = to_uint8(image)
  if pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())


def load_png(path) -> np.ndarray:
  """PNG -> [-1, 1] float32 (H, W, C)."""
  pixels = np.asarray(Image.open(io.BytesIO(storage.read_bytes(path))).convert("RGB"), np.float32)
  return pixels / 127.5 - 1.0

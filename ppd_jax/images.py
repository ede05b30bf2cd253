"""Image arrays in [-1, 1] (H, W, C) <-> PNG files."""
import os

import numpy as np
from PIL import Image


def to_uint8(image: np.ndarray) -> np.ndarray:
  """[-1, 1] float -> [0, 255] uint8, clipping what lies outside."""
  return np.round((np.clip(np.asarray(image, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def save_png(image: np.ndarray, path: str) -> None:
  """Writes atomically (temporary file + rename), so a killed run leaves no half-written PNG."""
  pixels = to_uint8(image)
  if pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  tmp = path + ".tmp"
  Image.fromarray(pixels).save(tmp, format="PNG")
  os.replace(tmp, path)


def load_png(path: str) -> np.ndarray:
  """PNG -> [-1, 1] float32 (H, W, C)."""
  pixels = np.asarray(Image.open(path).convert("RGB"), np.float32)
  return pixels / 127.5 - 1.0

"""A labelled pair's image, read for the VLM, and the two errors every pairs source raises.

Every source (users/shots.py: JSONL and Pick-a-Pic; users/reward_shots.py: reward users) reads its
images through decode_image, so an unreadable image is one UnreadablePair wherever it comes from.
"""
import io
import os

from PIL import Image

from ppd_jax import storage


class PairsError(ValueError):
  """Input the extraction cannot use; the message names the file, line or flag."""


class UnreadablePair(Exception):
  """One pair's image could not be read (replaced by the user's next pair)."""


def decode_image(data, where: str) -> Image.Image:
  """An image from its bytes or its path (local or URL), as RGB."""
  try:
    if isinstance(data, (str, os.PathLike)):
      data = storage.read_bytes(data)
    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB")
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise UnreadablePair(f"{where}: {e}") from None

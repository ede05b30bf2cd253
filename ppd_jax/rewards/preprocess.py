"""Images -> CLIP pixel input (NHWC float32), on the host, as the reward models were trained to see.

PickScore, HPSv2, CLIP score and the LAION aesthetic head all take OpenAI CLIP's preprocessing, so
a score is only comparable to published ones if the pixels match it. We follow transformers'
CLIPImageProcessorPil (5.23), step for step:
  resize the short side to `size` with PIL bicubic, the long side to floor(size * long / short);
  centre crop with top = (h - size) // 2, left = (w - size) // 2;
  x = float32(float64(u8) * (1 / 255));  x = (x - mean) / std in float32.
Tolerance: max |ours - transformers| = 0, bit-identical, measured on landscape, portrait, odd,
up-sampled and square sizes; tests/test_reward_preprocess.py asserts exactly that (the same PIL
resize, then the same IEEE float32 operations elementwise).

HPSv2's official code instead resizes the *long* side to 224 with torchvision tensor ops and pads to
square. On square images (the generated ones, our use case) that is the same resize up to resampling
differences; we keep the transformers/PIL path for every model.

Alpha is dropped (PIL's convert("RGB"), as OpenAI CLIP does), where transformers composites it onto
white: the two agree on every image without transparency.

Float arrays are the sampler's [-1, 1] convention, mapped with images.to_uint8, so scoring its
arrays gives exactly what scoring the PNGs that images.save_png writes would.
"""
import concurrent.futures
import io
import os

import numpy as np
from PIL import Image

from ppd_jax import images as image_io
from ppd_jax import storage

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MIN_PARALLEL = 16          # below this, a thread pool costs more than it saves


class ImageInputError(ValueError):
  """An image that cannot be read: a missing or undecodable file, or an array of the wrong kind."""


def _array_to_uint8(a: np.ndarray, where: str) -> np.ndarray:
  """[H, W, C] uint8 or [-1, 1] float, C in 1, 3, 4 -> [H, W, 3] uint8 (grey repeated, no alpha)."""
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or 0 in a.shape:
    raise ImageInputError(f"{where}: want [H, W, C] with C in 1, 3, 4; got shape {a.shape}")
  if np.issubdtype(a.dtype, np.floating):
    a = image_io.to_uint8(a)
  elif a.dtype != np.uint8:
    raise ImageInputError(f"{where}: want uint8 or float in [-1, 1]; got dtype {a.dtype}")
  if a.shape[-1] == 1:
    return np.repeat(a, 3, axis=-1)
  return np.ascontiguousarray(a[..., :3])


def _load(path) -> np.ndarray:
  """File (a local path or a URL, read through ppd_jax.storage) -> [H, W, 3] uint8, decoded now
  so a truncated file fails here."""
  try:
    with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
      im.load()
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
    raise ImageInputError(f"cannot read image {os.fspath(path)!r} ({type(e).__name__}: {e})") from e


def _one_to_uint8(item, index: int) -> np.ndarray:
  if isinstance(item, Image.Image):
    return np.asarray(item.convert("RGB"))
  if isinstance(item, (str, os.PathLike)):
    return _load(item)
  if isinstance(item, np.ndarray):
    return _array_to_uint8(item, f"image {index}")
  raise ImageInputError(f"image {index}: want an array, PIL image or path; "
                        f"got {type(item).__name__}")


def _items(images) -> list:
  """A batch array [N, H, W, C], one array [H, W, C], or a list/tuple -> a list of single images."""
  if isinstance(images, np.ndarray):
    if images.ndim == 3:
      return [images]
    if images.ndim == 4:
      return list(images)
    raise ImageInputError(f"images: want [N, H, W, C] or [H, W, C]; got shape {images.shape}")
  if isinstance(images, (list, tuple)):
    return list(images)
  raise ImageInputError(f"images: want an array or a list/tuple; got {type(images).__name__}")


def to_uint8_images(images) -> list[np.ndarray]:
  """-> one [H, W, 3] uint8 array per image, in order."""
  return [_one_to_uint8(x, i) for i, x in enumerate(_items(images))]


def _resize_crop(pixels: np.ndarray, size: int) -> np.ndarray:
  """Short side -> size (bicubic), long side -> floor(size * long / short), then the centre crop."""
  h, w = pixels.shape[:2]
  if h <= w:
    nh, nw = size, size * w // h
  else:
    nh, nw = size * h // w, size
  resized = np.asarray(Image.fromarray(pixels).resize((nw, nh), Image.Resampling.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  return resized[top:top + size, left:left + size]


def clip_pixels(images, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                workers: int | None = None) -> np.ndarray:
  """Images (anything to_uint8_images takes) -> [N, size, size, 3] float32, CLIP-normalised.

  workers: threads over images (PIL decodes and resizes without the GIL); default min(8, CPUs).
  Output order is input order whatever the thread count.
  """
  items = _items(images)
  workers = workers or min(8, os.cpu_count() or 1)

  def work(i: int) -> np.ndarray:
    return _resize_crop(_one_to_uint8(items[i], i), size)

  if workers > 1 and len(items) >= _MIN_PARALLEL:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      crops = list(pool.map(work, range(len(items))))
  else:
    crops = [work(i) for i in range(len(items))]
  u8 = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
  x = (u8.astype(np.float64) * (1 / 255)).astype(np.float32)   # transformers' rescale, bit for bit
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)

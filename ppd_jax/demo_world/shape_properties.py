"""What the synthetic users' hidden rewards are made of: shape-world properties read off pixels.

Users judge generated images, so their rewards must be functions of pixels, not of the attributes
an image was rendered from. For an image of one shape on a plain background:

    background  grey level of the border pixels (their per-channel median, averaged)
    size        sqrt(fraction of pixels that differ from the background): ~ the shape's radius
    x, y        centre of those pixels, fractions of the side (x right, y down)
    brightness  HSV value (max channel) of the mean colour of those pixels

Only evaluation and the labelling of pairs call this. The few-shot user embedder must not (it has
its own generic image statistics), just as a VLM does not get the user's reward function.
"""
import numpy as np

PROPERTIES = ("size", "x", "y", "brightness", "background")
_DIFFERENT = 0.15     # max-channel distance from the background colour that counts as "the shape"


def measure(images: np.ndarray) -> np.ndarray:
  """[N, S, S, 3] images in [-1, 1] -> [N, len(PROPERTIES)] float32 properties (columns above)."""
  x = (np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 0.5
  n, h, w, _ = x.shape
  border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
  bg = np.median(border, axis=1)                                    # [N, 3]
  mask = (np.abs(x - bg[:, None, None]).max(-1) > _DIFFERENT).astype(np.float32)
  area = mask.sum((1, 2))
  safe = np.maximum(area, 1.0)
  ys = (np.arange(h, dtype=np.float32) + 0.5) / h
  xs = (np.arange(w, dtype=np.float32) + 0.5) / w
  cx = np.where(area > 0, (mask * xs[None, None]).sum((1, 2)) / safe, 0.5)
  cy = np.where(area > 0, (mask * ys[None, :, None]).sum((1, 2)) / safe, 0.5)
  colour = (mask[..., None] * x).sum((1, 2)) / safe[:, None]
  value = np.where(area > 0, colour.max(-1), bg.max(-1))
  size = np.sqrt(area / (h * w))
  return np.stack([size, cx, cy, value, bg.mean(-1)], axis=1).astype(np.float32)


class Standardizer:
  """Properties -> zero-mean unit-variance features, with statistics fixed from one image set."""

  def __init__(self, properties: np.ndarray):
    self.mean = properties.mean(0).astype(np.float32)
    self.std = np.maximum(properties.std(0), 1e-3).astype(np.float32)

  def __call__(self, properties: np.ndarray) -> np.ndarray:
    return ((properties - self.mean) / self.std).astype(np.float32)


class PropertyFeatures:
  """Images -> some of the properties, standardised over a reference set (the pool): what the
  synthetic users' and reward users' hidden rewards weigh."""

  def __init__(self, reference_images: np.ndarray, properties):
    self.columns = [PROPERTIES.index(p) for p in properties]
    self.standardize = Standardizer(measure(reference_images)[:, self.columns])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return self.standardize(measure(images)[:, self.columns])

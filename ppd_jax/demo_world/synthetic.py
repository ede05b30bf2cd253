"""The demo's procedural world of coloured shapes: what the base model is pretrained to draw.

Images. One shape (circle, square or triangle) of one named colour on a grey background, rendered
with 4x4 supersampling at `model.sample_size` pixels, NHWC float32 in [-1, 1]. The caption names the
colour and the shape ("a red circle", "an orange square"), so 18 captions in all. Five properties
are NOT in the caption and vary freely among images of one caption:

    size        shape radius, a fraction of the image side          [0.18, 0.32]
    x, y        centre, fractions of the side (x right, y down)     [0.30, 0.70]
    brightness  HSV value of the shape colour                       [0.60, 1.00]
    background  grey level of the background                        [0.05, 0.75]

So a caption leaves room for taste: one user likes big shapes low in the frame, another small dim
shapes on dark backgrounds. demo/pretrain_base.py trains the base on these renders; the users and
their pairs (demo_world/synthetic_users.py) only ever see the base's own samples.
"""
import numpy as np

from ppd_jax.demo_world.text_hash import HashTextEncoder

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
HUES = np.array([0.0, 30.0, 55.0, 120.0, 225.0, 280.0], np.float32)    # degrees
HUE_JITTER = 6.0          # degrees either side, so one colour is not a single RGB value
SATURATION = 0.9

# Property -> (low, high) of its uniform distribution; reward features map this to [-1, 1].
RANGES = {
    "size": (0.18, 0.32),
    "x": (0.30, 0.70),
    "y": (0.30, 0.70),
    "brightness": (0.60, 1.00),
    "background": (0.05, 0.75),
}

# Shape extents relative to the radius (`size`): the square's half side and the triangle's
# circumradius, chosen so the three shapes look about equally large.
_SQUARE_HALF = 0.9
_TRIANGLE_RADIUS = 1.25
_SUPERSAMPLE = 4

# The caption encoder is part of the world, not of a run: the pretrained demo base learned captions
# through this exact table, so it does not follow config.seed.
TEXT_ENCODER_SEED = 20250111


def make_text_encoder(model_cfg, data_cfg) -> HashTextEncoder:
  return HashTextEncoder(dim=model_cfg.cross_attention_dim, max_length=data_cfg.text_length,
                         seed=TEXT_ENCODER_SEED)


def captions_list() -> list[str]:
  """All captions, in caption-id order: id = colour * len(SHAPES) + shape."""
  return [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c in COLOURS for s in SHAPES]


def caption_ids(attrs: dict) -> np.ndarray:
  return (attrs["colour"] * len(SHAPES) + attrs["shape"]).astype(np.int32)


def sample_attributes(rng: np.random.Generator, n: int, shape=None, colour=None) -> dict:
  """n random images' attributes (a dict of [n] arrays); shape/colour ids may be fixed."""
  shape = rng.integers(len(SHAPES), size=n) if shape is None else np.broadcast_to(shape, (n,))
  colour = rng.integers(len(COLOURS), size=n) if colour is None else np.broadcast_to(colour, (n,))
  attrs = {"shape": np.asarray(shape, np.int32), "colour": np.asarray(colour, np.int32)}
  attrs["hue"] = (HUES[attrs["colour"]]
                  + rng.uniform(-HUE_JITTER, HUE_JITTER, n)).astype(np.float32)
  for name, (lo, hi) in RANGES.items():
    attrs[name] = rng.uniform(lo, hi, n).astype(np.float32)
  return attrs


def take(attrs: dict, index) -> dict:
  """Indexes every attribute array alike."""
  return {k: v[index] for k, v in attrs.items()}


def _hsv_to_rgb(hue_deg, s, v):
  """Vectorised HSV -> RGB in [0, 1]; hue in degrees; returns [..., 3]."""
  h = (np.asarray(hue_deg) % 360.0) / 60.0
  out = []
  for n in (5.0, 3.0, 1.0):
    k = (n + h) % 6.0
    out.append(v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
  return np.stack(out, axis=-1)


def _coverage(attrs: dict, sample_size: int) -> np.ndarray:
  """[N, S, S] fraction of each pixel the shape covers (supersampled)."""
  s = sample_size * _SUPERSAMPLE
  c = ((np.arange(s, dtype=np.float32) + 0.5) / s)
  u = c[None, None, :] - attrs["x"][:, None, None]           # [N, 1, s]: right of centre
  v = c[None, :, None] - attrs["y"][:, None, None]           # [N, s, 1]: below centre
  r = attrs["size"][:, None, None]
  circle = u * u + v * v <= r * r
  square = np.maximum(np.abs(u), np.abs(v)) <= _SQUARE_HALF * r
  big = _TRIANGLE_RADIUS * r                                  # up-pointing, centred on centroid
  triangle = (v <= big / 2) & (np.abs(u) * np.sqrt(3.0) <= v + big)
  shape = attrs["shape"][:, None, None]
  inside = np.where(shape == 0, circle, np.where(shape == 1, square, triangle))
  n = inside.shape[0]
  inside = inside.reshape(n, sample_size, _SUPERSAMPLE, sample_size, _SUPERSAMPLE)
  return inside.mean(axis=(2, 4), dtype=np.float32)


def render(attrs: dict, sample_size: int = 16) -> np.ndarray:
  """Attributes -> [N, S, S, 3] float32 images in [-1, 1] (NHWC)."""
  cover = _coverage(attrs, sample_size)[..., None]
  fg = _hsv_to_rgb(attrs["hue"], SATURATION, attrs["brightness"])[:, None, None]
  bg = attrs["background"][:, None, None, None]
  img = cover * fg + (1.0 - cover) * bg
  return (img * 2.0 - 1.0).astype(np.float32)

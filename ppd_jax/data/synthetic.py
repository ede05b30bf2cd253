"""A procedural world of coloured shapes with synthetic users, for the demo and the tests.

Images. One shape (circle, square or triangle) of one named colour on a grey background, rendered
with 4x4 supersampling at `model.sample_size` pixels, NHWC float32 in [-1, 1]. The caption names the
colour and the shape ("a red circle", "an orange square"), so 18 captions in all. Five properties
are NOT in the caption and vary freely among images of one caption:

    size        shape radius, a fraction of the image side          [0.18, 0.32]
    x, y        centre, fractions of the side (x right, y down)     [0.30, 0.70]
    brightness  HSV value of the shape colour                       [0.60, 1.00]
    background  grey level of the background                        [0.05, 0.75]

Users. User u has a hidden unit weight vector w_u over those five properties, each mapped linearly
to [-1, 1] (`reward_features`); its reward is r_u = w_u . features. So one user likes big shapes
low in the frame, another small dim shapes on dark backgrounds; captions cannot tell them apart,
only the user embedding can. Ids 0..num_users-1 are training users, the next num_unseen_users are
held out.

Pairs. Each user labels `pairs_per_user` pairs: a random caption, two images of it with
independent properties, the one of higher reward preferred. Candidate pairs whose reward gap is
below `MIN_REWARD_GAP` are skipped, so every label is a clear one. A user's first `fewshot` pairs
make its embedding (users/fewshot.py, which sees images only). Training records are the pairs of
training users; unseen users' pairs exist for their embeddings and for evaluation.
"""
import numpy as np

from ppd_jax.data.text_hash import HashTextEncoder
from ppd_jax.users import fewshot

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
REWARD_FEATURES = tuple(RANGES)
MIN_REWARD_GAP = 0.25     # r has std ~0.58 over random images; gaps below this are not labelled
_CANDIDATES_PER_PAIR = 4  # candidate pairs drawn per kept pair (about 3 in 4 pass the gap)

# Shape extents relative to the radius (`size`): the square's half side and the triangle's
# circumradius, chosen so the three shapes look about equally large.
_SQUARE_HALF = 0.9
_TRIANGLE_RADIUS = 1.25
_SUPERSAMPLE = 4

# Streams of the seed, so that e.g. adding users never changes the text encoder.
_STREAM_USERS, _STREAM_PAIRS, _STREAM_TEXT = 1, 2, 3


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


def reward_features(attrs: dict) -> np.ndarray:
  """[N, 5] float32: each REWARD_FEATURES property mapped linearly from its range to [-1, 1]."""
  cols = [(attrs[k] - (lo + hi) / 2) / ((hi - lo) / 2) for k, (lo, hi) in RANGES.items()]
  return np.stack(cols, axis=-1).astype(np.float32)


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


def _sample_pairs(rng: np.random.Generator, weights: np.ndarray, pairs: int):
  """Per user, `pairs` clear pairs -> (winner attrs, loser attrs), each [U * pairs] user-major."""
  users = weights.shape[0]
  cand = pairs * _CANDIDATES_PER_PAIR
  n = users * cand
  a = sample_attributes(rng, n)
  b = sample_attributes(rng, n, shape=a["shape"], colour=a["colour"])
  a["hue"] = b["hue"]                         # same named colour; keep the exact hue too
  owner = np.repeat(np.arange(users), cand)
  ra = (reward_features(a) * weights[owner]).sum(-1).reshape(users, cand)
  rb = (reward_features(b) * weights[owner]).sum(-1).reshape(users, cand)
  # The first `pairs` candidates with a clear gap, in draw order; if a user had too few (very
  # unlikely), its largest remaining gaps fill in.
  gap = np.abs(ra - rb)
  key = np.where(gap >= MIN_REWARD_GAP, 0.0, 1.0 / (1.0 + gap))
  keep = np.argsort(key, axis=1, kind="stable")[:, :pairs]
  flat = (keep + np.arange(users)[:, None] * cand).reshape(-1)
  a_wins = (ra > rb).reshape(-1)[flat]
  a, b = take(a, flat), take(b, flat)
  winner = {k: np.where(a_wins, a[k], b[k]) for k in a}
  loser = {k: np.where(a_wins, b[k], a[k]) for k in a}
  return winner, loser


def _stream(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([stream, seed])


class SyntheticPreferences:
  """The demo's whole data set, built deterministically from the config in __init__.

  Records (what the trainer sees) are the pairs of training users, user-major: record i belongs to
  user i // pairs_per_user. `gather` is fancy indexing into precomputed arrays.
  """

  def __init__(self, config):
    d, m = config.data, config.model
    self.sample_size = m.sample_size
    self.pairs_per_user = d.pairs_per_user
    self.fewshot = d.fewshot
    if d.pairs_per_user < d.fewshot:
      raise ValueError(f"config.data.pairs_per_user={d.pairs_per_user} must be at least "
                       f"config.data.fewshot={d.fewshot}: every user's embedding needs its pairs")
    self.train_user_ids = np.arange(d.num_users, dtype=np.int32)
    self.unseen_user_ids = np.arange(d.num_users, d.num_users + d.num_unseen_users, dtype=np.int32)
    num_all = d.num_users + d.num_unseen_users

    # Hidden ground truth: evaluation may use it (user_reward), the embedder never does.
    w = _stream(config.seed, _STREAM_USERS).standard_normal((num_all, len(REWARD_FEATURES)))
    self.user_weights = (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)

    self.winner_attrs, self.loser_attrs = _sample_pairs(
        _stream(config.seed, _STREAM_PAIRS), self.user_weights, d.pairs_per_user)
    self._winners = render(self.winner_attrs, m.sample_size)
    self._losers = render(self.loser_attrs, m.sample_size)
    self._caption_ids = caption_ids(self.winner_attrs)

    self.captions = captions_list()
    text_seed = int(np.random.SeedSequence([_STREAM_TEXT, config.seed]).generate_state(1)[0])
    self.text_encoder = HashTextEncoder(dim=m.cross_attention_dim, max_length=d.text_length,
                                        seed=text_seed)
    self._text = self.text_encoder.encode(self.captions)

    self._user_embeddings = np.stack([
        fewshot.embed_user(p["winners"], p["losers"], p["captions"], m.user_tokens,
                           m.user_embed_dim)
        for p in map(self.fewshot_pairs, range(num_all))])
    self.num_records = d.num_users * d.pairs_per_user

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, i: int) -> dict:
    if not -self.num_records <= i < self.num_records:
      raise IndexError(f"record {i} of {self.num_records}")
    return {k: v[0] for k, v in self.gather(np.array([i % self.num_records])).items()}

  def gather(self, indices: np.ndarray) -> dict:
    """Record indices [B] -> dict of stacked arrays (see the module docstring for the keys)."""
    idx = np.asarray(indices, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_records):
      raise IndexError(f"record indices must be in [0, {self.num_records})")
    user = (idx // self.pairs_per_user).astype(np.int32)
    return {
        "preferred": self._winners[idx],
        "dispreferred": self._losers[idx],
        "text_embedding": self._text[self._caption_ids[idx]],
        "user_embedding": self._user_embeddings[user],
        "user_id": user,
    }

  def user_embedding(self, user_id: int) -> np.ndarray:
    """[user_tokens, user_embed_dim] float32, from the user's first `fewshot` pairs."""
    n = len(self._user_embeddings)
    if not isinstance(user_id, (int, np.integer)) or not 0 <= user_id < n:
      raise KeyError(f"unknown user {user_id!r}: this synthetic data set has users 0..{n - 1} "
                     f"(training 0..{len(self.train_user_ids) - 1}, the rest unseen)")
    return self._user_embeddings[user_id]

  def user_reward(self, user_id: int, attrs: dict) -> np.ndarray:
    """[N] float32 hidden reward of images described by attrs (evaluation only)."""
    return reward_features(attrs) @ self.user_weights[user_id]

  def user_pairs(self, user_id: int) -> dict:
    """All pairs of one user (training or unseen): images, captions and attributes."""
    rows = slice(user_id * self.pairs_per_user, (user_id + 1) * self.pairs_per_user)
    return {
        "winners": self._winners[rows],
        "losers": self._losers[rows],
        "captions": [self.captions[c] for c in self._caption_ids[rows]],
        "winner_attrs": take(self.winner_attrs, rows),
        "loser_attrs": take(self.loser_attrs, rows),
    }

  def fewshot_pairs(self, user_id: int) -> dict:
    """What the user embedder sees: winners[k] was preferred over losers[k] for captions[k]."""
    p = self.user_pairs(user_id)
    return {"winners": p["winners"][:self.fewshot], "losers": p["losers"][:self.fewshot],
            "captions": p["captions"][:self.fewshot]}

  def encode_captions(self, captions: list[str]) -> np.ndarray:
    """[N, text_length, cross_attention_dim] float32; "" is the unconditional embedding."""
    return self.text_encoder.encode(captions)

"""Synthetic users and their preference pairs over the frozen base's own samples.

Users. User u has a hidden unit weight vector w_u over `data.reward_properties` (some of the shape
properties of demo_world/shape_properties.py), each standardised over the pool; its reward
for an image is

    r_u(image) = w_u . standardise(measure(image))

measured from pixels, so it judges PPD's samples exactly as it judged the pairs. The population
(`data.population`):
  majority  w_u = normalise(d + sigma z_u), z_u ~ N(0, I): a shared direction d plus an individual
            deviation (sigma = data.taste_deviation). User u is in the majority when w_u . d > 0,
            which happens with probability Phi(1 / sigma) (0.75 at sigma = 1.5): a model that
            ignores the user can learn d and win for them, and loses for the minority.
  opposed   couples w_{2k+1} = -w_{2k}: no taste is the majority's, so a model that ignores the
            user scores exactly 1/2 on average.
Captions cannot tell users apart, only the user embedding can. Ids 0..num_users-1 are training
users, the next num_unseen_users are held out (never in a training record) for the reported
evaluation, and the next num_validation_users are held out too, for choosing the recipe
(validation while training, `val/*`), so that the users who chose it are not the ones it is
reported on. With no validation users, validation falls back to the unseen users.

Pairs. Each user labels `pairs_per_user` pairs: a random caption, two distinct pool images of it
(demo_world/base_pool.py: samples of the frozen base), the one of higher reward preferred.
Candidate pairs whose reward gap is below `data.min_reward_gap` are skipped, so every label is a
clear one. A user's first `fewshot` pairs make its embedding (users/fewshot.py, which sees images
only).

With data.user_conditioning False (the Diffusion-DPO baseline) every record and every user get
one constant embedding: the same pairs, the same trainable branch, no information about the user.
"""
import numpy as np

from ppd_jax.demo_world import base_pool
from ppd_jax.demo_world import shape_properties
from ppd_jax.demo_world import synthetic
from ppd_jax.users import fewshot

_STREAM_USERS, _STREAM_PAIRS, _STREAM_CONSTANT, _STREAM_DIRECTION = 1, 2, 3, 4
# The validation users' pairs come from their own stream, so adding them leaves every training
# and unseen user's pairs as they were (their weights are drawn after the others' in one stream).
_STREAM_VALIDATION_PAIRS = 5
_CANDIDATES_PER_PAIR = 8  # candidate pairs drawn per kept pair


def _stream(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([stream, seed])


def opposed_user_weights(rng: np.random.Generator, users: int, dims: int) -> np.ndarray:
  """[users, dims] unit vectors in opposed couples: user 2k+1 has minus user 2k's weights.

  Random unit vectors have no majority taste on average; pairing each with its opposite makes that
  exact for any even set of users (the training users and the unseen ones alike), so a model that
  ignores the user cannot win on average by luck of the draw, which is the setting PPD is for.
  """
  w = rng.standard_normal(((users + 1) // 2, dims))
  w = w / np.linalg.norm(w, axis=1, keepdims=True)
  return np.stack([w, -w], axis=1).reshape(-1, dims)[:users].astype(np.float32)


def majority_user_weights(rng: np.random.Generator, direction: np.ndarray, users: int,
                          deviation: float) -> np.ndarray:
  """[users, dims] unit vectors normalise(d + deviation z_u), z_u ~ N(0, I) (module docstring)."""
  w = direction[None, :] + deviation * rng.standard_normal((users, len(direction)))
  return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)


def population(seed: int, users: int, dims: int, kind: str, deviation: float):
  """(weights [users, dims], the population direction d [dims] or None for "opposed")."""
  rng = _stream(seed, _STREAM_USERS)
  if kind == "opposed":
    return opposed_user_weights(rng, users, dims), None
  if kind != "majority":
    raise ValueError(f"config.data.population={kind!r}: 'majority' or 'opposed'")
  d = _stream(seed, _STREAM_DIRECTION).standard_normal(dims)
  d = (d / np.linalg.norm(d)).astype(np.float32)
  return majority_user_weights(rng, d, users, deviation), d


def _sample_pairs(rng, features, caption_ids, weights, pairs: int, min_gap: float):
  """Per user, `pairs` clear pairs of one caption -> (winner, loser) pool indices [U, pairs]."""
  users, cand = weights.shape[0], pairs * _CANDIDATES_PER_PAIR
  by_caption = [np.flatnonzero(caption_ids == c) for c in range(caption_ids.max() + 1)]
  per = min(len(ix) for ix in by_caption)
  caption = rng.integers(len(by_caption), size=(users, cand))
  i = rng.integers(per, size=(users, cand))
  j = (i + 1 + rng.integers(per - 1, size=(users, cand))) % per           # j != i
  table = np.stack([ix[:per] for ix in by_caption])
  a, b = table[caption, i], table[caption, j]
  reward = features @ weights.T                                          # [P, U]
  ra = reward[a, np.arange(users)[:, None]]                               # [U, cand]
  rb = reward[b, np.arange(users)[:, None]]
  gap = np.abs(ra - rb)
  # The first `pairs` candidates with a clear gap, in draw order; should a user have too few,
  # its largest remaining gaps fill in.
  key = np.where(gap >= min_gap, 0.0, 1.0 / (1.0 + gap))
  keep = np.argsort(key, axis=1, kind="stable")[:, :pairs]
  a, b = np.take_along_axis(a, keep, 1), np.take_along_axis(b, keep, 1)
  a_wins = np.take_along_axis(ra > rb, keep, 1)
  return np.where(a_wins, a, b), np.where(a_wins, b, a)


class SyntheticPreferences:
  """The demo's whole data set, built deterministically from the config in __init__.

  Records (what the trainer sees) are the pairs of training users, user-major: record i belongs to
  user i // pairs_per_user. `gather` is fancy indexing into precomputed arrays.
  """

  def __init__(self, config, backbone=None, log=print):
    """backbone: the run's caption encoder and VAE (ppd_jax/backbones); default: built from config."""
    d, m = config.data, config.model
    if d.pairs_per_user < d.fewshot:
      raise ValueError(f"config.data.pairs_per_user={d.pairs_per_user} must be at least "
                       f"config.data.fewshot={d.fewshot}: every user's embedding needs its pairs")
    self.sample_size = m.sample_size
    self.pairs_per_user = d.pairs_per_user
    self.fewshot = d.fewshot
    self.user_conditioning = bool(d.user_conditioning)
    self.train_user_ids = np.arange(d.num_users, dtype=np.int32)
    self.unseen_user_ids = np.arange(d.num_users, d.num_users + d.num_unseen_users, dtype=np.int32)
    num_labelled = d.num_users + d.num_unseen_users
    num_all = num_labelled + d.get("num_validation_users", 0)
    self.validation_user_ids = np.arange(num_labelled, num_all, dtype=np.int32)

    self.backbone, pool = base_pool.with_backbone(config, backbone, log)
    self.pool_images, self.pool_caption_ids = pool.images, pool.caption_ids
    self.pool_latents = pool.latents
    self.reward_properties = tuple(d.reward_properties)
    self.features = shape_properties.PropertyFeatures(pool.images, self.reward_properties)
    self.pool_features = self.features(pool.images)

    # Hidden ground truth: evaluation and labelling use it (user_reward), the embedder never does.
    self.user_weights, self.population_direction = population(
        config.seed, num_all, len(self.reward_properties), d.get("population", "opposed"),
        d.get("taste_deviation", 1.5))
    pairs = [_sample_pairs(_stream(config.seed, stream), self.pool_features, self.pool_caption_ids,
                           weights, d.pairs_per_user, d.min_reward_gap)
             for stream, weights in ((_STREAM_PAIRS, self.user_weights[:num_labelled]),
                                     (_STREAM_VALIDATION_PAIRS, self.user_weights[num_labelled:]))
             if len(weights)]
    self.winner_index = np.concatenate([w for w, _ in pairs])
    self.loser_index = np.concatenate([l for _, l in pairs])

    self.captions = synthetic.captions_list()
    self._text = self.backbone.encode_captions(self.captions)

    if self.user_conditioning:
      self._user_embeddings = np.stack([
          fewshot.embed_user(p["winners"], p["losers"], p["captions"], m.user_tokens,
                             m.user_embed_dim)
          for p in map(self.fewshot_pairs, range(num_all))])
    else:
      constant = _stream(config.seed, _STREAM_CONSTANT).standard_normal(
          (m.user_tokens, m.user_embed_dim)).astype(np.float32)
      self._user_embeddings = np.broadcast_to(constant, (num_all,) + constant.shape)
    self.num_records = d.num_users * d.pairs_per_user

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, i: int) -> dict:
    if not -self.num_records <= i < self.num_records:
      raise IndexError(f"record {i} of {self.num_records}")
    return {k: v[0] for k, v in self.gather(np.array([i % self.num_records])).items()}

  def gather(self, indices: np.ndarray) -> dict:
    """Record indices [B] -> dict of stacked arrays: preferred, dispreferred [B, s, s, C] (the
    UNet's x0: images in pixel space, else VAE latents), the text conditioning (text_embedding
    [B, L, D], for SDXL also pooled_text_embedding and time_ids), user_embedding [B, tokens, dim],
    user_id [B]."""
    idx = np.asarray(indices, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_records):
      raise IndexError(f"record indices must be in [0, {self.num_records})")
    return self._pairs(idx // self.pairs_per_user, idx % self.pairs_per_user, idx)

  def _pairs(self, user: np.ndarray, k: np.ndarray, pair: np.ndarray) -> dict:
    """Pair k of each user -> the batch dict of `gather` (pair: the ids reported with it)."""
    win, lose = self.winner_index[user, k], self.loser_index[user, k]
    caption = self.pool_caption_ids[win]
    return {
        "preferred": self.pool_latents[win],
        "dispreferred": self.pool_latents[lose],
        **{k: v[caption] for k, v in self._text.items()},
        "user_embedding": self._user_embeddings[user],
        "user_id": user.astype(np.int32),
        "pair": pair.astype(np.int64),
    }

  def held_out(self) -> "HeldOutPairs":
    """The validation users' pairs (never in a training record), for validation while training;
    the unseen users' where there are no validation users (data.num_validation_users = 0)."""
    return HeldOutPairs(self)

  @property
  def held_out_user_ids(self) -> np.ndarray:
    """Whose pairs validation scores: the validation users, else the unseen ones."""
    return self.validation_user_ids if len(self.validation_user_ids) else self.unseen_user_ids

  def check_user(self, user_id) -> None:
    n = len(self.user_weights)
    if not isinstance(user_id, (int, np.integer)) or not 0 <= user_id < n:
      raise KeyError(f"unknown user {user_id!r}: this synthetic data set has users 0..{n - 1} "
                     f"(training 0..{len(self.train_user_ids) - 1}, then "
                     f"{len(self.unseen_user_ids)} unseen, then "
                     f"{len(self.validation_user_ids)} validation)")

  def user_group(self, user_id: int) -> str | None:
    """"majority" when w_u . d > 0, else "minority"; None for a population without a majority."""
    self.check_user(user_id)
    if self.population_direction is None:
      return None
    return "majority" if self.user_weights[user_id] @ self.population_direction > 0 else "minority"

  def user_embedding(self, user_id: int) -> np.ndarray:
    """[user_tokens, user_embed_dim] float32, from the user's first `fewshot` pairs."""
    self.check_user(user_id)
    return np.array(self._user_embeddings[user_id])

  def user_reward(self, user_id: int, images: np.ndarray) -> np.ndarray:
    """[N] float32 hidden reward of images [N, S, S, 3] (evaluation and labelling only)."""
    self.check_user(user_id)
    return self.features(images) @ self.user_weights[user_id]

  def user_pairs(self, user_id: int) -> dict:
    """All pairs of one user (training or unseen): images, captions and pool indices."""
    self.check_user(user_id)
    win, lose = self.winner_index[user_id], self.loser_index[user_id]
    return {"winners": self.pool_images[win], "losers": self.pool_images[lose],
            "captions": [self.captions[c] for c in self.pool_caption_ids[win]],
            "winner_index": win, "loser_index": lose}

  def fewshot_pairs(self, user_id: int) -> dict:
    """What the user embedder sees: winners[k] was preferred over losers[k] for captions[k]."""
    p = self.user_pairs(user_id)
    return {"winners": p["winners"][:self.fewshot], "losers": p["losers"][:self.fewshot],
            "captions": p["captions"][:self.fewshot]}

  def encode_captions(self, captions: list[str]) -> dict:
    """Text conditioning dict (ppd_jax/backbones): text_embedding [N, L, D], ...; "" is unconditional."""
    return self.backbone.encode_captions(captions)


class HeldOutPairs:
  """A PairSource over the held-out users' pairs of a SyntheticPreferences (held_out_user_ids:
  the validation users, else the unseen ones): record i is pair i % pairs_per_user of held-out
  user i // pairs_per_user; `pair` ids continue after the training records'."""

  def __init__(self, source: SyntheticPreferences):
    self.source = source

  def __len__(self) -> int:
    return len(self.source.held_out_user_ids) * self.source.pairs_per_user

  def gather(self, indices: np.ndarray) -> dict:
    idx = np.asarray(indices, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
      raise IndexError(f"held-out record indices must be in [0, {len(self)})")
    per = self.source.pairs_per_user
    user = self.source.held_out_user_ids[idx // per].astype(np.int64)
    return self.source._pairs(user, idx % per, self.source.num_records + idx)

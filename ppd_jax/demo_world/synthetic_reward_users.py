"""The demo world's reward users: Section 5.1's experiment (reward models as users) on a laptop.

Three rewards over the shape properties that partly conflict, as CLIP, Aesthetic and HPS do:

    vivid     r = (size + brightness) / sqrt 2           big, bright shapes
    airy      r = (background - size) / sqrt 2           small shapes on a light ground
    contrast  r = (brightness - background) / sqrt 2     bright shapes on a dark ground

on standardised properties (demo_world/shape_properties.py), so corr(vivid, airy) = -1/2,
corr(vivid, contrast) = +1/2, corr(airy, contrast) = -1/2. No one image maximises all three, so a
model that ignores the user cannot serve them all: Diffusion-DPO on the union of their labels
learns the mean direction (brightness only), which leaves airy where it was.

Reward user k (data.reward_users[k]) has the id -(k + 1), as data/reward_users.py numbers the
Pick-a-Pic ones, and labels `pairs_per_user` clear pairs of the frozen base's samples
(data/synthetic_users._sample_pairs, min gap data.min_reward_gap; a fresh draw per user: the
hash assignment's one use of each pair). Its embedding is the few-shot embedder's
(users/fewshot.py) on 4 of its pairs: sample 0 on its first 4, samples 1..data.user_samples-1 on
other seeded 4-subsets; with data.user_sample = "random" each record is shown one of them,
sample hash(seed, record) mod S, as the VLM path shows Pick-a-Pic pairs. data.relabel_rewards
keeps some reward users' pairs (the single-reward upper bounds of Table 1).
"""
import numpy as np

from ppd_jax.demo_world import base_pool
from ppd_jax.data import pickapic
from ppd_jax.demo_world import shape_properties
from ppd_jax.demo_world import synthetic
from ppd_jax.demo_world import synthetic_users
from ppd_jax.users import fewshot

PROPERTIES = ("size", "brightness", "background")
REWARDS = {                         # name -> weights over PROPERTIES (normalised below)
    "vivid": (1.0, 1.0, 0.0),
    "airy": (-1.0, 0.0, 1.0),
    "contrast": (0.0, 1.0, -1.0),
}
_STREAM_PAIRS, _STREAM_HELD_OUT, _STREAM_SAMPLES, _STREAM_CONSTANT = 11, 12, 13, 14


def user_id(k: int) -> int:
  return -(k + 1)


def reward_weights(names) -> np.ndarray:
  """[R, len(PROPERTIES)] unit weight vectors of the named rewards."""
  unknown = [n for n in names if n not in REWARDS]
  if unknown:
    raise ValueError(f"data.reward_users: unknown reward(s) {unknown}; one of {sorted(REWARDS)}")
  w = np.array([REWARDS[n] for n in names], np.float32)
  return w / np.linalg.norm(w, axis=1, keepdims=True)


def selected(names, wanted: str) -> list[str]:
  """data.relabel_rewards ("" = all, else comma-separated) -> the reward users trained on."""
  keep = [n.strip() for n in wanted.split(",") if n.strip()] or list(names)
  unknown = [n for n in keep if n not in names]
  if unknown:
    raise ValueError(f"data.relabel_rewards: {unknown} are not in data.reward_users {list(names)}")
  return keep


class RewardUserPreferences:
  """PairSource of the reward users' pairs (module docstring); records are user-major."""

  def __init__(self, config, backbone=None, log=print):
    d, m = config.data, config.model
    self.names = tuple(d.reward_users)
    self.weights = reward_weights(self.names)
    self.pairs_per_user, self.fewshot = d.pairs_per_user, d.fewshot
    self.user_ids = np.array([user_id(k) for k in range(len(self.names))], np.int64)
    keep = selected(self.names, d.get("relabel_rewards", ""))
    self.train_user_ids = np.array([user_id(self.names.index(n)) for n in keep], np.int64)
    self.unseen_user_ids = np.zeros(0, np.int64)
    self.backbone, pool = base_pool.with_backbone(config, backbone, log)
    self.pool_images, self.pool_latents = pool.images, pool.latents
    self.pool_caption_ids = pool.caption_ids
    self.features = shape_properties.PropertyFeatures(pool.images, PROPERTIES)
    features = self.features(pool.images)
    draw = lambda stream, n: synthetic_users._sample_pairs(
        np.random.default_rng([stream, config.seed]), features, pool.caption_ids, self.weights,
        n, d.min_reward_gap)
    self.winner_index, self.loser_index = draw(_STREAM_PAIRS, d.pairs_per_user)
    self.held_winner, self.held_loser = draw(_STREAM_HELD_OUT, max(d.pairs_per_user // 8, 8))
    self.captions = synthetic.captions_list()
    self._text = self.backbone.encode_captions(self.captions)
    self.seed = config.seed
    self.random_sample = d.get("user_sample", "first") == "random"
    if d.user_conditioning:
      # "first" shows sample 0 only: the other samples are not computed.
      count = d.user_samples if self.random_sample else 1
      self._samples = np.stack([self._embeddings(k, count, m, config.seed)
                                for k in range(len(self.names))])       # [R, S, T, D]
    else:
      constant = np.random.default_rng([_STREAM_CONSTANT, config.seed]).standard_normal(
          (m.user_tokens, m.user_embed_dim)).astype(np.float32)
      self._samples = np.broadcast_to(constant, (len(self.names), 1) + constant.shape)
    rows = [k for k in range(len(self.names)) if self.names[k] in keep]
    self._users = np.repeat(np.array(rows), d.pairs_per_user)
    self._pairs = np.tile(np.arange(d.pairs_per_user), len(rows))
    log(f"reward users: {', '.join(f'{n} ({user_id(k)})' for k, n in enumerate(self.names))}; "
        f"training on {len(self)} pairs of {', '.join(keep)}")

  def _embeddings(self, k: int, samples: int, m, seed: int) -> np.ndarray:
    """[samples, T, D]: sample 0 from the user's first 4 pairs, the rest from seeded 4-subsets."""
    rng = np.random.default_rng([_STREAM_SAMPLES, seed, k])
    picks = [np.arange(self.fewshot)] + [
        np.sort(rng.choice(self.pairs_per_user, self.fewshot, replace=False))
        for _ in range(samples - 1)]
    win, lose = self.winner_index[k], self.loser_index[k]
    return np.stack([fewshot.embed_user(
        self.pool_images[win[p]], self.pool_images[lose[p]],
        [self.captions[c] for c in self.pool_caption_ids[win[p]]], m.user_tokens,
        m.user_embed_dim) for p in picks])

  def __len__(self) -> int:
    return len(self._users)

  def gather(self, indices: np.ndarray) -> dict:
    idx = np.asarray(indices, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
      raise IndexError(f"record indices must be in [0, {len(self)})")
    k, j = self._users[idx], self._pairs[idx]
    sample = np.zeros(len(idx), np.int64)
    if self.random_sample:
      draw = pickapic.seeded_hash(idx, self.seed, salt=0x05A7)
      sample = (draw % np.uint64(self._samples.shape[1])).astype(np.int64)
    return self._batch(k, self.winner_index[k, j], self.loser_index[k, j], sample, idx)

  def _batch(self, k, win, lose, sample, pair) -> dict:
    caption = self.pool_caption_ids[win]
    return {"preferred": self.pool_latents[win], "dispreferred": self.pool_latents[lose],
            **{name: v[caption] for name, v in self._text.items()},
            "user_embedding": np.asarray(self._samples[k, np.minimum(
                sample, self._samples.shape[1] - 1)], np.float32),
            "user_id": (-(k + 1)).astype(np.int32), "pair": pair.astype(np.int64)}

  def held_out(self) -> "HeldOutRewardPairs":
    return HeldOutRewardPairs(self)

  def check_user(self, uid) -> None:
    if not isinstance(uid, (int, np.integer)) or uid not in self.user_ids:
      raise KeyError(f"unknown user {uid!r}: the reward users are "
                     + ", ".join(f"{user_id(k)} ({n})" for k, n in enumerate(self.names)))

  def user_embedding(self, uid: int) -> np.ndarray:
    """[T, D] float32: the reward user's sample-0 embedding (its first 4 pairs)."""
    self.check_user(uid)
    return np.array(self._samples[-int(uid) - 1, 0], np.float32)

  def user_reward(self, uid: int, images: np.ndarray) -> np.ndarray:
    """[N] the reward's score of images [N, S, S, 3] in [-1, 1]."""
    self.check_user(uid)
    return self.features(images) @ self.weights[-int(uid) - 1]

  def encode_captions(self, captions: list[str]) -> dict:
    return self.backbone.encode_captions(captions)


class HeldOutRewardPairs:
  """The reward users' validation pairs (a separate draw, never trained on): validation loss."""

  def __init__(self, source: RewardUserPreferences):
    self.source = source
    self.per = source.held_winner.shape[1]
    self.rows = np.array([-int(u) - 1 for u in source.train_user_ids])      # reward indices k

  def __len__(self) -> int:
    return len(self.rows) * self.per

  def gather(self, indices: np.ndarray) -> dict:
    idx = np.asarray(indices, np.int64)
    k, j = self.rows[idx // self.per], idx % self.per
    s = self.source
    return s._batch(k, s.held_winner[k, j], s.held_loser[k, j], np.zeros(len(idx), np.int64),
                    len(s) + idx)

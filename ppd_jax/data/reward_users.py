"""Reward models as users: each reward's labels of the Pick-a-Pic pairs (from data/relabel.py).

For a pair with scores (s_0, s_1) of its two images under reward k (Diffusion-DPO's AI feedback):

    preferred_k = 1 if s_1 > s_0 else 0,   kept iff finite and |s_1 - s_0| >= min_margin and s_1 != s_0

A tie carries no preference and is dropped (and counted) whatever the margin; so are pairs under
the margin and pairs with an image that did not decode. With assign="hash" each pair goes to one
reward user, chosen by a seeded hash of the pair's identity (the paper's one epoch at 768 pairs per
step uses each pair once); with assign="all" it serves every reward user that keeps it.

Reward user k has the id -(k + 1): Pick-a-Pic's user ids are positive, so the two never collide
in a user-embedding store. The output, labels-{split}.npz per split of the shard folder, lists
rows of that split's records table (a record may appear once per reward user) with the reward
user's id and whether the record's stored (preferred, dispreferred) latents must be swapped.
"""
import os

import numpy as np

from ppd_jax import storage
from ppd_jax.data import pickapic
from ppd_jax.data import reward_scores
from ppd_jax.data import shards

ASSIGN = ("hash", "all")
LABELS = "reward_users.json"


def user_id(k: int) -> int:
  return -(k + 1)


def labels_for(record_pairs: np.ndarray, original_preferred: np.ndarray, keys: np.ndarray,
               scores: list[np.ndarray], min_margin: float, assign: str, seed: int):
  """One split: record rows -> (labels {record, user_id, flip}, counts per reward).

  record_pairs [R] index positions of the records; original_preferred [R] the stored winner (0/1);
  keys [R] the pairs' identity hashes; scores: per reward [R, 2].
  """
  if assign not in ASSIGN:
    raise ValueError(f"--assign={assign!r}: one of {', '.join(ASSIGN)}")
  n, rows, users, flips, counts = len(record_pairs), [], [], [], []
  owner = (pickapic.seeded_hash(keys, seed, salt=0x5EED) % np.uint64(len(scores))
           if assign == "hash" else None)
  for k, s in enumerate(scores):
    mine = np.ones(n, bool) if owner is None else owner == k
    finite = np.isfinite(s).all(axis=1)
    margin = np.abs(s[:, 1] - s[:, 0])
    tie = finite & (s[:, 1] == s[:, 0])
    under = finite & ~tie & (margin < min_margin)
    keep = mine & finite & ~tie & ~under
    preferred = (s[:, 1] > s[:, 0]).astype(np.int64)
    rows.append(np.flatnonzero(keep))
    users.append(np.full(int(keep.sum()), user_id(k), np.int64))
    flips.append((preferred != original_preferred)[keep])
    counts.append({"assigned": int(mine.sum()), "kept": int(keep.sum()),
                   "failed": int((mine & ~finite).sum()), "ties": int((mine & tie).sum()),
                   "under_margin": int((mine & under).sum()),
                   "flipped": int(flips[-1].sum())})
  order = np.argsort(np.concatenate(rows), kind="stable")
  labels = {"record": np.concatenate(rows)[order].astype(np.int64),
            "user_id": np.concatenate(users)[order],
            "flip": np.concatenate(flips)[order].astype(bool)}
  return labels, counts


def build(shard_dir: str, out: str, rewards: list[str], min_margin: float = 0.0,
          assign: str = "hash", seed: int = 0, log=print) -> dict:
  """Writes out/labels-{split}.npz and out/reward_users.json; returns the latter."""
  if min_margin < 0:
    raise ValueError(f"--min_margin={min_margin}: must be >= 0")
  index = pickapic.PickapicIndex.load(os.path.join(shard_dir, "index"))
  by_reward = {}
  for name in rewards:
    pairs, scores = reward_scores.read_scores(out, name)
    by_reward[name] = dict(zip(pairs.tolist(), scores))
  summary = {"shards": os.fspath(storage.path(shard_dir)), "rewards": list(rewards), "user_ids": {n: user_id(k) for k, n in enumerate(rewards)},
             "min_margin": min_margin, "assign": assign, "seed": seed, "counts": {}}
  for split in reward_scores.SPLITS:
    path = os.path.join(shard_dir, f"records-{split}.npz")
    if not storage.exists(path):
      continue
    pairs = shards.read_npz(path)["pair"].astype(np.int64)
    missing = {n for n, table in by_reward.items() if any(int(p) not in table for p in pairs)}
    if missing:
      raise shards.ShardsError(f"{out}: the {split} records have pairs without {sorted(missing)} "
                               "scores; finish python -m ppd_jax.data.relabel first")
    scores = [np.stack([by_reward[n][int(p)] for p in pairs]) if len(pairs) else
              np.zeros((0, 2), np.float32) for n in rewards]
    labels, counts = labels_for(pairs, index.pairs["preferred"][pairs], index.pairs["key"][pairs],
                                scores, min_margin, assign, seed)
    shards.commit_npz(os.path.join(out, f"labels-{split}.npz"), labels)
    summary["counts"][split] = dict(zip(rewards, counts))
    for n, c in zip(rewards, counts):
      log(f"reward users: {split} {n} (user {user_id(rewards.index(n))}): {c['kept']} of "
          f"{c['assigned']} assigned pairs kept ({c['ties']} ties, {c['under_margin']} under "
          f"the margin, {c['failed']} failed), {c['flipped']} flipped")
  shards.write_json(os.path.join(out, LABELS), summary)
  return summary


def read_summary(folder: str) -> dict:
  path = os.path.join(folder, LABELS)
  if not storage.exists(path):
    raise shards.ShardsError(f"data.relabel={folder}: no {LABELS} (python -m ppd_jax.data.relabel "
                             "writes it once every pair is scored)")
  return shards.read_json(path)


def selected_ids(summary: dict, names: str) -> np.ndarray:
  """data.relabel_rewards ("" = all, else comma-separated names) -> their reward user ids."""
  wanted = [n.strip() for n in names.split(",") if n.strip()] or summary["rewards"]
  unknown = [n for n in wanted if n not in summary["user_ids"]]
  if unknown:
    raise ValueError(f"data.relabel_rewards: {unknown} are not reward users of this relabel "
                     f"folder ({', '.join(summary['rewards'])})")
  return np.array([summary["user_ids"][n] for n in wanted], np.int64)


def onehot(summary: dict, user_ids) -> np.ndarray:
  """The learned-code ablation's input: reward user -(k + 1) -> e_k, [N, 1, R] float32 (the
  trained projector turns it into that reward's code)."""
  k = -np.asarray(user_ids, np.int64) - 1
  out = np.zeros((len(k), 1, len(summary["rewards"])), np.float32)
  out[np.arange(len(k)), 0, k] = 1.0
  return out

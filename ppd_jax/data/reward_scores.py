"""The reward-score table that data/relabel.py writes and data/reward_users.py reads.

    RELABEL_DIR/scores/<reward>/file-<id>.npz = {pair [n] index positions, score [n, 2]}

one file per (reward, input file), NaN where an image did not decode. Both sides use this module,
so the labels never import the scoring CLI.
"""
import os

import numpy as np

from ppd_jax import storage
from ppd_jax.data import shards

SPLITS = ("train", "validation")        # the shard folder's record tables that get labels


def read_scores(out: str, reward: str) -> tuple[np.ndarray, np.ndarray]:
  """(pair positions [P], scores [P, 2]) of one reward, every file's units together."""
  folder = storage.path(os.path.join(out, "scores", reward))
  if not folder.is_dir():
    raise shards.ShardsError(f"{out}: no scores for reward {reward!r} (run "
                             "python -m ppd_jax.data.relabel with it)")
  parts = [shards.read_npz(os.fspath(folder / name))
           for name in sorted(p.name for p in folder.iterdir()) if name.endswith(".npz")]
  pairs = np.concatenate([p["pair"] for p in parts])
  return pairs, np.concatenate([p["score"] for p in parts])

"""Reward users' labelled pairs for the VLM (users/embed.py --pairs=RELABEL_DIR), Section 5.1.

A reward user (data/reward_users.py) is shown its pairs as a person would be: the pair's caption
and its two parquet JPEGs, with the image its reward scored higher as the preferred one,

    preferred = 1 + (person's winner XOR flip)        (1: jpg_0, 2: jpg_1, as for people)

A pair's id here is its row in the relabel folder's labels-train.npz, not its index position:
with --assign=all one index pair serves several reward users under different labels, and the
embedding store's shot_ids must say which. A reward user's pairs are in a seeded order (the
relabel seed, a hash of each pair's identity), so sample 0 is its first N and --samples=256 draws
255 further N-subsets (users/shots.plan), the many 4-pair embeddings training draws from
(data.user_sample = "random").

The relabel and shard folders may be URLs (gs://...), read through ppd_jax.storage.
"""
import os

import numpy as np

from ppd_jax import storage
from ppd_jax.users import prompts
from ppd_jax.users import pair_image

ORDER_SALT = 0x0D0E


def is_relabel_folder(path: str) -> bool:
  from ppd_jax.data import reward_users
  return storage.exists(os.path.join(path, reward_users.LABELS))


class RewardUserShots:
  """The reward users of a relabel folder as a pairs source for users/shots.plan and resolve."""

  def __init__(self, folder: str, shots: int):
    from ppd_jax.data import pickapic
    from ppd_jax.data import reward_users
    from ppd_jax.data import shards
    self.folder = os.fspath(storage.path(folder))
    self.summary = reward_users.read_summary(folder)
    shard_dir = self.summary.get("shards")
    if not shard_dir or not storage.path(shard_dir).is_dir():
      raise pair_image.PairsError(
          f"--pairs={folder}: {reward_users.LABELS} names no readable shard folder "
          f"({shard_dir!r}); rerun python -m ppd_jax.data.relabel to rebuild the labels")
    labels_path = os.path.join(folder, "labels-train.npz")
    if not storage.exists(labels_path):
      raise pair_image.PairsError(f"--pairs={folder}: no labels-train.npz")
    self.index = pickapic.PickapicIndex.load(os.path.join(shard_dir, "index"))
    labels = shards.read_npz(labels_path)
    records = shards.read_npz(os.path.join(shard_dir, "records-train.npz"))["pair"].astype(
        np.int64)
    self.positions = records[labels["record"]]              # label row -> index position
    self.flip = labels["flip"].astype(bool)
    self.user_ids = user_ids = labels["user_id"].astype(np.int64)
    keys = pickapic.seeded_hash(self.index.pairs["key"][self.positions],
                                int(self.summary["seed"]), ORDER_SALT)
    order = np.lexsort((np.arange(len(keys)), keys, user_ids))   # by user, then seeded key
    self._order = {}
    for u in np.unique(user_ids).tolist():
      mine = order[user_ids[order] == u].tolist()
      if len(mine) >= shots:
        self._order[u] = mine
    self.users = np.asarray(sorted(self._order), np.int64)
    names = {v: k for k, v in self.summary["user_ids"].items()}
    self.names = {u: names.get(u, str(u)) for u in self.users.tolist()}
    self.report = {"users_too_few_pairs": len(np.unique(user_ids)) - len(self._order)}
    self._source = {"kind": "reward_users", "path": self.folder, "shards": shard_dir,
                    "rewards": self.summary["rewards"], "assign": self.summary["assign"],
                    "min_margin": self.summary["min_margin"], "seed": self.summary["seed"],
                    "labels": int(len(user_ids))}

  def describe(self) -> dict:
    return self._source

  def candidates(self, user_id: int) -> list[int]:
    return self._order[int(user_id)]

  def load(self, pair_ids: list[int]) -> dict:
    """{label row: prompts.Pair under its reward's label, or UnreadablePair}."""
    from ppd_jax.data import pickapic
    rows = np.asarray(pair_ids, np.int64)
    wanted = np.unique(self.positions[rows])
    read = {r["pair"]: r for r in pickapic.read_pairs(self.index, wanted)}
    out = {}
    for row in rows.tolist():
      r = read[int(self.positions[row])]
      where = (f"pair {r['pair']} (labels-train.npz row {row}) of reward user "
               f"{self.names.get(int(self.user_ids[row]), self.user_ids[row])}")
      try:
        out[row] = prompts.Pair(r["caption"], pair_image.decode_image(r["jpg_0"], where),
                                pair_image.decode_image(r["jpg_1"], where),
                                1 + (int(r["preferred"]) ^ int(self.flip[row])))
      except pair_image.UnreadablePair as e:
        out[row] = e
    return out

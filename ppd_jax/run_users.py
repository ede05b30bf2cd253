"""The users a Pick-a-Pic run generates for, kept in its workdir beside checkpoints/: sampling and
export then need neither the training shards nor the embedding store at their original paths.

Training writes, on process 0 at every start (trainer.py):
  W/users.safetensors  every user's embedding as the run sees it, as a user-embedding store
                       (data/user_store.py): the store's sample-0 entry and profile
                       (data.user_embedding = "store", its "source" kept so that a new user is
                       embedded the same way, users/new_user.py) or the one-hot code ("onehot")
  W/users.json         where they came from, the shard index's split of its users
                       {"train", "validation", "unseen"}, and for a table whose users are
                       named (data/table_convert.py) the map {"names": {name: id}}, so that
                       `sample --user=NAME` finds them
A run without user conditioning writes neither (every user is the zero embedding). A run trained
before these files existed reads config.data.user_embeddings instead.
"""
import json

import numpy as np

from ppd_jax import storage
from ppd_jax.data import user_store

STORE_FILE = "users.safetensors"
INFO_FILE = "users.json"
SPLITS = ("train", "validation", "unseen")


def id_ranges(ids, first: int = 8) -> str:
  """Integer ids as a reader takes them in: "0..127" when contiguous, else the first few and
  the count ("3, 17, 42, ... (900 in all)")."""
  ids = np.unique(np.asarray(ids, np.int64))
  if ids.size == 0:
    return "none"
  if ids.size > 2 and ids[-1] - ids[0] + 1 == ids.size:
    return f"{ids[0]}..{ids[-1]}"
  shown = ", ".join(str(i) for i in ids[:first])
  return shown + (f", ... ({ids.size} in all)" if ids.size > first else "")


def save(workdir, source, config) -> str | None:
  """W/users.safetensors and W/users.json for a Pick-a-Pic source (module docstring); None and
  nothing written for other sources (the demo worlds re-make their users from the config) and
  for runs without user conditioning."""
  if config.data.source != "pickapic" or source.inputs.mode == "none":
    return None
  folder = storage.makedirs(workdir)
  if source.inputs.mode == "store":
    store = source.store
    rows = np.flatnonzero(store.samples == 0)          # each user's sample 0, the one used
    ids, origin = store.user_ids[rows], store.path
  else:   # one-hot codes of the reward users the run trained on
    ids, origin = np.unique(source.record_user_ids).astype(np.int64), config.data.relabel
  info = {"users": len(ids), "from": str(origin), "user_embedding": source.inputs.mode,
          "shards": config.data.shards,
          "splits": {name: [int(u) for u in getattr(source, f"{name}_user_ids")]
                     for name in SPLITS}}
  names = storage.path(config.data.shards) / "table" / "user_ids.json"
  if config.data.shards and names.exists():
    info["names"] = json.loads(names.read_text())
  path, info_path = folder / STORE_FILE, folder / INFO_FILE
  if path.exists() and info_path.exists() and json.loads(info_path.read_text()) == info:
    return str(path)   # a resume: the same users from the same store, already kept
  if source.inputs.mode == "store":
    embeddings = np.asarray(store.embeddings[rows])
    profiles = [store.profile_of_row(int(r)) or "" for r in rows] if store.has_profiles else None
    meta = store.source
  else:
    embeddings, profiles = source.inputs.get_many(ids), None
    meta = {"embedder": "one-hot code of the reward user"}
  user_store.write_store(str(path), ids, embeddings, profiles=profiles, source=meta)
  storage.write_text(info_path, json.dumps(info, indent=1) + "\n")
  return str(path)


class RunUsers:
  """A Pick-a-Pic run's users for sampling: embeddings, profiles and splits from the workdir
  (module docstring), the backbone built on first use by `backbone_fn`."""

  def __init__(self, workdir, config, backbone_fn):
    self.config, self._backbone_fn, self._backbone = config, backbone_fn, None
    d = config.data
    folder = storage.path(workdir)
    self.conditioned = bool(d.user_conditioning)
    self.splits = {name: np.zeros(0, np.int64) for name in SPLITS}
    self.store = None
    self.names = {}    # name -> id, for a table whose users are named
    if not self.conditioned:
      return
    if (folder / STORE_FILE).exists():
      self.store = user_store.UserEmbeddingStore(str(folder / STORE_FILE))
      if (folder / INFO_FILE).exists():
        info = json.loads((folder / INFO_FILE).read_text())
        self.names = {str(k): int(v) for k, v in info.get("names", {}).items()}
        self.splits.update({k: np.intersect1d(np.asarray(v, np.int64), self.store.users)
                            for k, v in info["splits"].items()})   # those it can sample
    elif d.get("user_embedding", "store") == "store":
      self.store = user_store.UserEmbeddingStore(d.user_embeddings)
    else:
      raise ValueError(f"{folder / STORE_FILE} is missing: this run's one-hot user codes were "
                       "not kept (trained before the workdir held its users); sample it with "
                       f"its relabel folder {d.relabel} and shards in place")

  @property
  def train_user_ids(self) -> np.ndarray:
    return self.splits["train"]

  @property
  def validation_user_ids(self) -> np.ndarray:
    return self.splits["validation"]

  @property
  def unseen_user_ids(self) -> np.ndarray:
    return self.splits["unseen"]

  @property
  def user_ids(self) -> np.ndarray:
    """Every user the run can generate for, increasing."""
    return self.store.users if self.store is not None else np.zeros(0, np.int64)

  def check_user(self, user_id) -> None:
    if self.store is not None and isinstance(user_id, str):
      named = sorted(self.names)
      shown = ", ".join(named[:8]) + (f", ... ({len(named)} in all)" if len(named) > 8 else "")
      raise KeyError(f"unknown user {user_id!r}: " + (f"this run's users are named {shown}"
                     if named else f"this run's users are numbered "
                     f"({id_ranges(self.store.users)})"))
    if self.store is not None and user_id not in self.store:
      raise KeyError(f"unknown user {user_id!r}: this run has {self.store.num_users} users "
                     f"({id_ranges(self.store.users)})")

  def user_embedding(self, user_id) -> np.ndarray:
    """[tokens, dim] float32; a run without user conditioning gives every user zeros [1, 1]."""
    if self.store is None:
      return np.zeros((1, 1), np.float32)
    self.check_user(user_id)
    return self.store[user_id]

  @property
  def backbone(self):
    if self._backbone is None:
      self._backbone = self._backbone_fn()
    return self._backbone

  def encode_captions(self, captions: list[str]) -> dict:
    return self.backbone.encode_captions(captions)


def groups(users) -> list[tuple[int, str]]:
  """(user id, group) for every user a run's users (RunUsers or a demo source) know: train,
  validation, unseen, or "store" for a store's user in none of the splits."""
  out, seen = [], set()
  for name in SPLITS:
    for u in getattr(users, f"{name}_user_ids", ()):
      out.append((int(u), name))
      seen.add(int(u))
  for u in getattr(users, "user_ids", ()):
    if int(u) not in seen:
      out.append((int(u), "store"))
  return sorted(out)

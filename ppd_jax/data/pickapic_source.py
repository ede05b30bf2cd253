"""Training pairs from precomputed Pick-a-Pic shards, each joined with its user's embedding.

A record is read by random access from the split's ArrayRecord shards (data/shards.py), its text
conditioning from the caption store and its user embedding from the user-embedding store
(data/user_store.py), so each is stored once however many pairs share it. Which records exist and
whose they are comes from records-{split}.npz, so the join is checked before training starts: a
pair whose user has no embedding is an error naming them, or, with
data.missing_user_embeddings = "drop", left out (and counted). A pair whose caption's text
conditioning is non-finite (listed in the manifest by the precompute) is always left out and
counted: its record is in the shards, but one NaN in a batch would spoil the whole update.

With data.relabel = RELABEL_DIR (data/relabel.py, data/reward_users.py) the pairs are the reward
users' instead: labels-{split}.npz lists records (one per reward user that labels it) with that
user's id and whether its stored (preferred, dispreferred) latents swap. The records themselves,
and so the latents, are the shard folder's: nothing is recomputed or copied.
data.relabel_rewards keeps some reward users only (a single-reward DPO row of Table 1).
The relabel folder may be a URL (gs://...); the shard folder must be local, as ArrayRecord files
are read locally only.

What reaches the user branch (`UserInputs`): the store's embedding of the pair's user
(data.user_embedding = "store"), a one-hot code of its reward user ("onehot": the learned-code
ablation), or, with data.user_conditioning = False (the Diffusion-DPO and SFT baselines), one
all-zero embedding for every pair: no user information at all. From a store, data.user_sample
= "first" takes each user's sample 0 (the embedding of its recorded few-shot pairs), "random" one
of the user's entries per pair, drawn by a seeded hash of its loader row, so a reward user embedded
from 256 different 4-pair samples is seen through all of them, as people are through their own 4:

    entry(pair i of user u) = first_entry(u) + hash(seed, i) mod entries(u)
"""
import os

import numpy as np

from ppd_jax import storage
from ppd_jax.data import pickapic
from ppd_jax.data import records as records_lib
from ppd_jax.data import reward_users
from ppd_jax.data import shards
from ppd_jax.data import user_store as store_lib


class MissingUserEmbeddings(ValueError):
  """Pairs of users the store has no embedding for; the message lists them."""


def check_profile_in_caption(folder: str, manifest: dict, wanted: bool) -> None:
  """Shards encode either plain or profile-joined captions; training on the other kind would
  silently run the wrong baseline. A manifest from before the switch holds plain captions."""
  made = bool(manifest["data"].get("profile_in_caption", False))
  if made != bool(wanted):
    raise shards.ShardsError(
        f"{folder} was made with data.profile_in_caption={made}, the config has "
        f"data.profile_in_caption={bool(wanted)}: its text conditioning holds "
        f"{'captions joined with profiles' if made else 'plain captions'}. Use shards made with "
        "the same setting (python -m ppd_jax.data.precompute), or change the config.")


def user_shape(d, store_shape=None) -> tuple[int, int]:
  """[tokens, dim] the user branch is fed: (1, R) for one-hot codes of R reward users, (1, 1) for
  the zero embedding of unconditioned runs, else the store's (store_shape)."""
  if not d.user_conditioning:
    return 1, 1
  if d.get("user_embedding", "store") == "onehot":
    return 1, len(reward_users.read_summary(d.relabel)["rewards"])
  return store_shape


class UserInputs:
  """User ids -> what the user branch sees (module docstring)."""

  def __init__(self, d, seed: int = 0):
    self.mode = ("none" if not d.user_conditioning else d.get("user_embedding", "store"))
    self.store = (store_lib.UserEmbeddingStore(d.user_embeddings) if self.mode == "store"
                  else None)
    self.summary = reward_users.read_summary(d.relabel) if self.mode == "onehot" else None
    self.random_sample = self.mode == "store" and d.get("user_sample", "first") == "random"
    self.seed = seed

  def missing(self, user_ids: np.ndarray) -> np.ndarray:
    return self.store.missing(user_ids) if self.store is not None else np.zeros(0, np.int64)

  def sampled_rows(self, user_ids: np.ndarray, items: np.ndarray) -> np.ndarray:
    """data.user_sample = "random": the store row each item (a loader row) is shown with,
    first_entry(u) + hash(seed, item) mod entries(u)."""
    ids = np.asarray(user_ids, np.int64)
    first = np.searchsorted(self.store.user_ids, ids, side="left")
    count = np.searchsorted(self.store.user_ids, ids, side="right") - first
    draw = pickapic.seeded_hash(np.asarray(items, np.int64), self.seed, salt=0x05A7)
    return first + (draw % count.astype(np.uint64)).astype(np.int64)

  def get_many(self, user_ids: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
    """[B] user ids (and, for the random draw, the loader rows they come from) -> [B, tokens,
    dim] float32."""
    if self.mode == "store":
      if self.random_sample and items is not None:
        rows = self.sampled_rows(user_ids, items)
        return np.asarray(self.store.embeddings[rows], dtype=np.float32)
      return self.store.get_many(user_ids)
    if self.mode == "onehot":
      return reward_users.onehot(self.summary, user_ids)
    return np.zeros((len(user_ids), 1, 1), np.float32)

  @property
  def path(self) -> str:
    return self.store.path if self.store is not None else f"({self.mode} user inputs)"


def _relabelled(folder: str, split: str, num_records: int) -> dict:
  path = os.path.join(folder, f"labels-{split}.npz")
  if not storage.exists(path):
    raise shards.ShardsError(f"data.relabel={folder}: no {os.path.basename(path)} (python -m "
                             "ppd_jax.data.relabel writes it once every pair is scored)")
  labels = shards.read_npz(path)
  if len(labels["record"]) and labels["record"].max() >= num_records:
    raise shards.ShardsError(f"{path} lists records beyond the {num_records} of this shard "
                             "folder's {split} split: it was made from other shards")
  return labels


class PickapicPairs:
  """A PairSource (data/pipeline.py) over one split of a shard folder."""

  def __init__(self, config, backbone=None, log=print, split: str = "train"):
    d = config.data
    if storage.is_url(d.shards):
      raise shards.ShardsError(
          f"data.shards={d.shards}: the shard folder must be on a local disk (ArrayRecord files "
          "are read locally only); copy it there (e.g. gcloud storage cp -r) and point "
          "data.shards at the copy")
    self.folder, self.split = os.path.abspath(d.shards), split
    self.manifest = shards.read_manifest(self.folder)
    check_profile_in_caption(self.folder, self.manifest, d.get("profile_in_caption", False))
    table = dict(np.load(os.path.join(self.folder, f"records-{split}.npz")))
    self._paths = [os.path.join(self.folder, "pairs", s["file"])
                   for s in self.manifest["shards"] if s["split"] == split]
    stored = sum(s["count"] for s in self.manifest["shards"] if s["split"] == split)
    if stored != len(table["pair"]):
      raise shards.ShardsError(f"{self.folder}: records-{split}.npz lists {len(table['pair'])} "
                               f"pairs, the shards hold {stored}; rerun the precompute")
    rows, flip = np.arange(len(table["pair"])), np.zeros(len(table["pair"]), bool)
    if d.get("relabel"):
      labels = _relabelled(d.relabel, split, len(table["pair"]))
      keep_users = reward_users.selected_ids(reward_users.read_summary(d.relabel),
                                             d.get("relabel_rewards", ""))
      labels = {k: v[np.isin(labels["user_id"], keep_users)] for k, v in labels.items()}
      rows, flip = labels["record"], labels["flip"]
      table = {**{k: v[rows] for k, v in table.items()}, "user_id": labels["user_id"]}
      log(f"pickapic: {split} labels of {len(np.unique(labels['user_id']))} reward users from "
          f"{d.relabel} ({int(flip.sum())} of {len(rows)} pairs swapped)")
    self.inputs = UserInputs(d, seed=config.seed)
    self.store = self.inputs.store          # the embedding store, if the inputs come from one
    keep = self._finite_text(table["caption_id"], log)
    keep[keep] = self._join(table["user_id"][keep], d.missing_user_embeddings, log)
    kept = np.flatnonzero(keep)
    self._records, self._flip = rows[kept], flip[kept]
    self.record_user_ids = table["user_id"][kept]
    self.record_pairs = table["pair"][kept]
    self.with_time_ids = config.model.get("addition_embed_type") == "text_time"
    self.text = shards.TextStore(self.folder, self.manifest)
    users = dict(np.load(os.path.join(self.folder, "index", "users.npz")))
    self.train_user_ids = users["user_id"][users["split"] == pickapic.TRAIN]
    self.validation_user_ids = users["user_id"][users["split"] == pickapic.VALIDATION]
    self.unseen_user_ids = users["user_id"][users["split"] == pickapic.TEST]
    self._config, self._backbone, self._data = config, backbone, None
    log(f"pickapic: {len(self)} {split} pairs of {len(np.unique(self.record_user_ids))} users "
        f"from {len(self._paths)} shards in {self.folder}")

  def _finite_text(self, caption_ids: np.ndarray, log) -> np.ndarray:
    """Records whose text conditioning is finite. A manifest from before the check lists none."""
    bad = np.asarray(self.manifest["text"].get("nonfinite", []), np.int64)
    ok = ~np.isin(caption_ids, bad)
    if not ok.all():
      used = np.unique(caption_ids[~ok])
      log(f"pickapic: leaving out {int((~ok).sum())} {self.split} pairs whose text conditioning "
          f"is non-finite ({len(used)} of the manifest's {len(bad)} non-finite texts: text ids "
          f"{', '.join(str(i) for i in used[:10])}{' ...' if len(used) > 10 else ''})")
    return ok

  def _join(self, user_ids: np.ndarray, policy: str, log) -> np.ndarray:
    missing = self.inputs.missing(np.unique(user_ids))
    has = ~np.isin(user_ids, missing)
    if len(missing):
      shown = ", ".join(str(u) for u in missing[:20]) + (" ..." if len(missing) > 20 else "")
      what = (f"{int((~has).sum())} {self.split} pairs of {len(missing)} users have no embedding "
              f"in {self.inputs.path}: users {shown}")
      if policy != "drop":
        raise MissingUserEmbeddings(
            f"{what}. Embed those users, or set config.data.missing_user_embeddings='drop'.")
      log(f"pickapic: dropping {what}")
    return has

  def __len__(self) -> int:
    return len(self._records)

  def __getstate__(self):
    return {**self.__dict__, "_data": None, "_backbone": None}   # Grain workers re-open files

  @property
  def _source(self):
    if self._data is None:
      from array_record.python import array_record_data_source
      self._data = array_record_data_source.ArrayRecordDataSource(self._paths)
    return self._data

  def gather(self, indices: np.ndarray) -> dict:
    """Record indices [B] -> preferred, dispreferred [B, h, w, c] float32 latents, the text
    conditioning (SDXL: with each pair's own size time_ids), user_embedding [B, tokens, dim],
    user_id [B] and pair [B] int64."""
    idx = np.asarray(indices, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
      raise IndexError(f"record indices must be in [0, {len(self)})")
    raw = self._source.__getitems__(self._records[idx].tolist())
    batch = records_lib.stack([records_lib.decode(r) for r in raw])
    swap = self._flip[idx][:, None, None, None]
    user_ids = self.record_user_ids[idx].astype(np.int64)   # the record's, or its reward user's
    out = {"preferred": np.where(swap, batch["dispreferred"], batch["preferred"]).astype(
               np.float32),
           "dispreferred": np.where(swap, batch["preferred"], batch["dispreferred"]).astype(
               np.float32),
           **self.text.get(batch["caption_id"]),
           "user_embedding": self.inputs.get_many(user_ids, idx),
           "user_id": user_ids,
           "pair": batch["pair"].astype(np.int64)}     # position in the index: provenance
    if self.with_time_ids:
      out["time_ids"] = batch["time_ids"].astype(np.float32)
    return out

  # --- what sampling and evaluation use -------------------------------------------------------
  def user_embedding(self, user_id: int) -> np.ndarray:
    """[tokens, dim] float32 (from the store: any user it has, seen in training or not)."""
    if self.store is not None:
      return self.store[user_id]
    return self.inputs.get_many(np.array([user_id]))[0]

  @property
  def backbone(self):
    """The caption encoder and VAE, built on first use: training reads precomputed data only."""
    if self._backbone is None:
      from ppd_jax import backbones
      self._backbone = backbones.build_backbone(self._config)
    return self._backbone

  def encode_captions(self, captions: list[str]) -> dict:
    return self.backbone.encode_captions(captions)

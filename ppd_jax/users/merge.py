"""Joins the stores of sharded extraction jobs (users/embed.py --shard_index) into one.

  python -m ppd_jax.users.merge --out=users.safetensors users-0.safetensors users-1.safetensors

Refuses stores made with other settings, a user entry found twice, and (unless --allow_partial)
a missing shard; the output is written atomically.
"""
import os
import sys

import numpy as np
from absl import app
from absl import flags

from ppd_jax import cli_logging
from ppd_jax.data.user_store import StoreError, UserEmbeddingStore, write_store


def merge_stores(out, paths, *, allow_partial: bool = False) -> UserEmbeddingStore:
  """Several stores (e.g. users/embed.py's --shard_index outputs) -> one store at out.

  They must agree on tokens, dim, shots, profiles and their producer's settings (source, less its
  per-job "shard" and "report" entries); a (user, sample) in two inputs is refused. When the
  inputs carry shard numbers, all num_shards of them must be present unless allow_partial.
  """
  out = os.fspath(out)
  if not paths:
    raise StoreError(f"{out}: no stores to merge")
  stores = [UserEmbeddingStore(p) for p in paths]
  first = stores[0]
  per_job = ("shard", "report")
  common = {k: v for k, v in first.source.items() if k not in per_job}
  for s in stores[1:]:
    shape = lambda x: [x.tokens, x.dim, x.shot_ids.shape[1]]
    if shape(s) != shape(first):
      raise StoreError(f"{s.path}: [tokens, dim, shots] = {shape(s)} but {first.path} has "
                       f"{shape(first)}")
    mine = {k: v for k, v in s.source.items() if k not in per_job}
    if mine != common:
      keys = sorted(k for k in set(mine) | set(common) if mine.get(k) != common.get(k))
      raise StoreError(f"{s.path}: made with other settings than {first.path} (source keys "
                       f"{keys} differ)")
    if s.has_profiles != first.has_profiles:
      raise StoreError(f"{s.path}: profiles present in some inputs only ({first.path}: "
                       f"{first.has_profiles})")
  shards = [s.source.get("shard") for s in stores]
  if any(shards):
    if not all(shards) or len({sh["count"] for sh in shards}) != 1:
      raise StoreError(f"{out}: inputs mix shard counts: "
                       + ", ".join(f"{s.path}: {s.source.get('shard')}" for s in stores))
    have = [sh["index"] for sh in shards]
    dup = sorted({i for i in have if have.count(i) > 1})
    lacking = sorted(set(range(shards[0]["count"])) - set(have))
    if dup:
      raise StoreError(f"{out}: shard(s) {dup} given twice")
    if lacking and not allow_partial:
      raise StoreError(f"{out}: shard(s) {lacking} of {shards[0]['count']} are missing; pass "
                       "them too, or allow a partial merge")
  profiles = None
  if first.has_profiles:
    profiles = [s.profile_of_row(r) for s in stores for r in range(len(s))]
  source = {**common, "merged_from": [os.path.basename(s.path) for s in stores]}
  if any("report" in s.source for s in stores):
    source["reports"] = [s.source.get("report") for s in stores]
  write_store(out, np.concatenate([s.user_ids for s in stores]),
              np.concatenate([s.embeddings for s in stores]),
              samples=np.concatenate([s.samples for s in stores]),
              shot_ids=np.concatenate([s.shot_ids for s in stores]), profiles=profiles,
              source=source)
  return UserEmbeddingStore(out)


def _define_flags():
  flags.DEFINE_string("out", None, "the merged store (.safetensors)")
  flags.DEFINE_bool("allow_partial", False, "merge even when some shards are missing")
  flags.mark_flags_as_required(["out"])


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  f = flags.FLAGS
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError("name the stores to merge after the flags")
  try:
    merged = merge_stores(f.out, inputs, allow_partial=f.allow_partial)
  except (ValueError, OSError) as e:
    sys.exit(f"ppd_jax.users.merge: {e}")
  print(f"merged {len(inputs)} stores into {f.out}: {merged.num_users} users, "
        f"{merged.num_entries} entries")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

"""Joins the stores of sharded extraction jobs (users/embed.py --shard_index) into one.

  python -m ppd_jax.users.merge --out=users.safetensors users-0.safetensors users-1.safetensors

Refuses stores made with other settings, a user entry found twice, and (unless --allow_partial)
a missing shard; the output is written atomically.
"""
import sys

from absl import app
from absl import flags

from ppd_jax.users import store as store_lib


def _define_flags():
  flags.DEFINE_string("out", None, "the merged store (.safetensors)")
  flags.DEFINE_bool("allow_partial", False, "merge even when some shards are missing")
  flags.mark_flags_as_required(["out"])


def main(argv):
  f = flags.FLAGS
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError("name the stores to merge after the flags")
  try:
    merged = store_lib.merge_stores(f.out, inputs, allow_partial=f.allow_partial)
  except (ValueError, OSError) as e:
    sys.exit(f"ppd_jax.users.merge: {e}")
  print(f"merged {len(inputs)} stores into {f.out}: {merged.num_users} users, "
        f"{merged.num_entries} entries")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

"""One user's embedding from a trained run, in the form the exported diffusers pipeline takes.

  python -m ppd_jax.users.embedding --workdir=W --user=ID --out=user.npy
  python -m ppd_jax.users.embedding --workdir=W --users=3:0.5,70:0.5 --out=mix.npy
  python -m ppd_jax.users.embedding --workdir=W --pairs=FOUR_PAIRS.json --out=new.npy

--out writes a .npy file of float32 [tokens, dim]: exactly what `python -m ppd_jax.sample` feeds
the user branch for the same flags, and what the script `python -m ppd_jax.export` prints loads
(`user_embedding = np.load("user.npy")`). Without --out it prints the array as a JSON list.
`python -m ppd_jax.sample --workdir=W --list_users` lists the run's user ids.
"""
import io
import json
import os
import sys

import numpy as np
from absl import app
from absl import flags

from ppd_jax import checkpoint
from ppd_jax import cli_logging
from ppd_jax import inference
from ppd_jax import storage
from ppd_jax.users import new_user


def _define_flags():
  """Defined only when run as a script, so tests can import this module beside other CLIs."""
  flags.DEFINE_string("workdir", None, "the training run's folder (holds checkpoints/)")
  flags.DEFINE_string("user", None, "user id (python -m ppd_jax.sample --workdir=W --list_users "
                      "lists them)")
  flags.DEFINE_string("users", None, "a mix of users as ID:WEIGHT,ID:WEIGHT (weights normalised)")
  flags.DEFINE_string("pairs", None, "a new user: JSON list / JSONL of their labelled pairs "
                      "{caption, image_1, image_2, preferred}")
  flags.DEFINE_string("vlm", None, "with --pairs: the VLM checkpoint, if not where the run's user "
                      "store says")
  flags.DEFINE_integer("step", None, "checkpoint step whose run to read (default: the latest)")
  flags.DEFINE_string("out", None, "a .npy file for the float32 [tokens, dim] embedding "
                      "(default: print it as JSON)")
  flags.mark_flags_as_required(["workdir"])


def parse_users(user: str | None, users: str | None,
                pairs: str | None = None) -> list[tuple[str, float]]:
  """--user=ID or --users=ID:W,ID:W -> [(id, weight), ...]; --pairs=FILE -> [(FILE's name, 1)]."""
  if sum(x is not None for x in (user, users, pairs)) != 1:
    raise ValueError("give exactly one of --user=ID, --users=ID:WEIGHT,ID:WEIGHT or "
                     "--pairs=FILE")
  if pairs is not None:
    return [(os.path.splitext(os.path.basename(pairs))[0], 1.0)]
  if user is not None:
    return [(user, 1.0)]
  out = []
  for part in users.split(","):
    uid, sep, weight = part.partition(":")
    try:
      out.append((uid.strip(), float(weight) if sep else 1.0))
    except ValueError:
      raise ValueError(f"--users: weight {weight!r} of user {uid!r} is not a number") from None
  return out


def user_key(uid: str, names: dict | None = None):
  """The demo's and Pick-a-Pic's users are numbered; a table with named users
  (data/table_convert.py) maps each name to its number (RunUsers.names), and a name wins over
  reading the text as a number; other stores key users by string."""
  if names and uid in names:
    return names[uid]
  return int(uid) if uid.lstrip("-").isdigit() else uid


def run_user_key(run, uid: str):
  """user_key with the run's own name map, if it has one."""
  return user_key(uid, getattr(run.users, "names", None))


def stored_embedding(run, uid: str) -> np.ndarray:
  """One stored user's [tokens, dim]; an unknown id is a KeyError naming the valid ones and how
  to list them all."""
  try:
    return run.users.user_embedding(run_user_key(run, uid))
  except KeyError as e:
    raise KeyError(f"{e.args[0]}; list them all with: python -m ppd_jax.sample "
                   f"--workdir={run.workdir} --list_users") from None


def embedding_for(run, mix: list[tuple[str, float]], pairs: str | None = None,
                  vlm: str | None = None) -> tuple[np.ndarray, str | None]:
  """([tokens, dim] float32, profile or None): a new user's from --pairs (embedded as the run's
  users were, users/new_user.py), else the weighted mix of stored users (inference.mix_users)."""
  if pairs is not None:
    return new_user.embed_new_user(run, pairs, vlm_model=vlm)
  embeddings = [stored_embedding(run, uid) for uid, _ in mix]
  return inference.mix_users(embeddings, [w for _, w in mix]), None


def save(path: str, embedding: np.ndarray) -> None:
  """A .npy file (local path or URL)."""
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(embedding, np.float32))
  storage.write_bytes(path, buffer.getvalue())


def main(argv):
  cli_logging.setup()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    if f.out is not None and not f.out.endswith(".npy"):
      raise ValueError(f"--out={f.out} must end in .npy")
    mix = parse_users(f.user, f.users, f.pairs)
    run = inference.load_trained(f.workdir, f.step)
    embedding, _ = embedding_for(run, mix, f.pairs, f.vlm)
  except KeyError as e:
    sys.exit(f"ppd_jax.users.embedding: {e.args[0] if e.args else e}")
  except (ValueError, OSError, checkpoint.CheckpointError) as e:
    sys.exit(f"ppd_jax.users.embedding: {e}")
  if f.out is None:
    print(json.dumps(np.asarray(embedding, np.float32).tolist()))
    return
  save(f.out, embedding)
  print(f"wrote {f.out}: float32 {list(embedding.shape)} (step {run.step} of {f.workdir})")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

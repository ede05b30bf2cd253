"""Pick-a-Pic users -> user-embedding store, with image statistics: a stand-in, not the paper's.

PPD's user embedding is the hidden state of a VLM (LLaVA-OneVision) that has looked at a user's
N = 4 few-shot pairs: `python -m ppd_jax.users.embed` (users/embed.py, users/vlm.py). This module
fills the same store (data/user_store.py) with the same interface, [tokens, dim] float32 per user,
from fewshot.embed_user: statistics of each winner minus its loser, in seconds on a CPU and with no
VLM weights. It is for smoke-testing the Pick-a-Pic pipeline end to end before a VLM is at hand
(it does separate the synthetic data's brighter/darker and bigger/smaller users); it is not the
method of the paper and says nothing about its results.

Every user of the index is embedded, whatever its split: unseen test users are conditioned on
their few-shot embedding too, which is the point of PPD. A few-shot pair whose JPEG does not
decode (listed in the precompute manifest, or found here) is replaced by the user's next pair;
a user left with fewer than N usable pairs is skipped and reported.

  python -m ppd_jax.users.embed_statistics --shards=SHARD_DIR --out=USERS.safetensors \
      [--tokens=1 --dim=3584 --size=64 --input=PARQUET_DIR]
"""
import os
import sys

import numpy as np

from ppd_jax import cli_logging
from ppd_jax import storage
from ppd_jax.data import images
from ppd_jax.data import pickapic
from ppd_jax.data import shards
from ppd_jax.users import fewshot
from ppd_jax.data import user_store as store

EMBEDDER = "image_statistics"
# Few-shot pairs per read_pairs call: files are grouped so each is still read once, while the JPEG
# bytes held at a time stay bounded (real Pick-a-Pic images are ~0.1-1 MB each).
_READ_CHUNK = 1024
_LISTED = 10                # decode failures and skipped users logged one by one


class EmbedError(ValueError):
  """Input this tool cannot use (missing folder, index or parquet file); the message names it."""


def _to_u8(x: np.ndarray) -> np.ndarray:
  """load_square's [-1, 1] float32 back to its uint8 pixels: exact, and a quarter of the memory
  while a user's pairs wait for the other files they are in."""
  return np.rint((x + 1.0) * 127.5).astype(np.uint8)


def _from_u8(u8: np.ndarray) -> np.ndarray:
  return u8.astype(np.float32) / 127.5 - 1.0     # load_square's own arithmetic: bit-identical


def _check_file(index: pickapic.PickapicIndex, f: int, checked: set) -> None:
  """A file that changed since indexing would silently give other rows: refuse it."""
  if f in checked:
    return
  path = index.paths[f]
  if not storage.exists(path):
    raise EmbedError(f"{path}: parquet file not found (moved? pass --input=THE_PARQUET_FOLDER)")
  if pickapic.file_fingerprint(path) != index.files[f]:
    raise EmbedError(f"{path} changed since it was indexed; re-index it")
  checked.add(f)


def _read_chunks(index, positions):
  """read_pairs over `positions` in file-grouped chunks; yields (positions, rows or None, error)."""
  positions = np.asarray(sorted(positions), np.int64)
  file_of = index.pairs["file_id"][positions]
  order = np.argsort(file_of, kind="stable")
  positions, file_of = positions[order], file_of[order]
  cuts = np.flatnonzero(np.diff(file_of)) + 1
  chunk = []
  for part in np.split(positions, cuts):
    chunk.append(part)
    if sum(map(len, chunk)) >= _READ_CHUNK:
      yield from _read_chunk(index, np.concatenate(chunk))
      chunk = []
  if chunk:
    yield from _read_chunk(index, np.concatenate(chunk))


def _read_chunk(index, positions):
  try:
    yield positions, pickapic.read_pairs(index, positions), None
    return
  except Exception:  # pyarrow raises many types; retry file by file to isolate the bad one
    pass
  for f in np.unique(index.pairs["file_id"][positions]):
    mine = positions[index.pairs["file_id"][positions] == f]
    try:
      yield mine, pickapic.read_pairs(index, mine), None
    except Exception as e:
      yield mine, None, f"{index.paths[f]}: cannot read ({type(e).__name__}: {e})"


def _decode(index, positions, size, decoded, excluded, log) -> int:
  """Decodes pairs into `decoded` {position: (uint8 [2, S, S, 3], caption, preferred)}; pairs that
  fail go into `excluded`. Returns how many failed."""
  failed = 0
  checked = set()
  for f in np.unique(index.pairs["file_id"][np.asarray(list(positions), np.int64)]):
    _check_file(index, int(f), checked)

  def fail(pos: int, reason) -> None:
    nonlocal failed
    excluded.add(pos)
    failed += 1
    if failed <= _LISTED:
      log(f"embed_statistics: pair {pos} of user {index.pairs['user_id'][pos]} skipped: {reason}")

  for chunk, rows, error in _read_chunks(index, positions):
    for row in rows or [{"pair": int(p)} for p in chunk]:
      if rows is None:
        fail(row["pair"], error)
        continue
      try:
        pixels = [_to_u8(images.load_square(row[c], size)[0]) for c in pickapic.IMAGE_COLUMNS]
      except images.ImageError as e:
        fail(row["pair"], e)
        continue
      decoded[row["pair"]] = (np.stack(pixels), row["caption"], row["preferred"])
  if failed > _LISTED:
    log(f"embed_statistics: ... {failed - _LISTED} more pairs skipped")
  return failed


def _fewshot(index, i: int, excluded: set) -> np.ndarray:
  """User row i's few-shot positions given the exclusions (ValueError when too few remain)."""
  row = index.users["fewshot"][i]
  if not any(int(p) in excluded for p in row):
    return row                                   # what fewshot_pairs returns, without its scan
  uid = index.users["user_id"][i]
  ex = np.fromiter(excluded, np.int64, len(excluded))
  return index.fewshot_pairs(uid, ex[index.pairs["user_id"][ex] == uid].tolist())


def embed_users(index: pickapic.PickapicIndex, *, tokens: int, dim: int, size: int = 64,
                exclude=(), log=print) -> tuple[np.ndarray, np.ndarray]:
  """Every user of the index (all splits) -> (user_ids [U'] int64, embeddings [U', tokens, dim]
  float32), U' <= U: users left with fewer than N decodable pairs are skipped and logged.

  exclude: pair positions known not to decode (the precompute manifest's "skipped"); they and any
  pair that fails here are replaced by the user's next pairs (PickapicIndex.fewshot_pairs).
  """
  if tokens < 1 or dim < 1 or size < 1:
    raise ValueError(f"tokens={tokens}, dim={dim}, size={size} must all be >= 1")
  num_pairs = len(index.pairs["user_id"])
  excluded = {int(p) for p in exclude}
  bad = [p for p in excluded if not 0 <= p < num_pairs]
  if bad:
    raise ValueError(f"exclude holds positions outside the index's {num_pairs} pairs: {bad[:5]}")
  user_ids = index.users["user_id"]
  decoded, chosen, skipped = {}, {}, {}
  pending, failed = list(range(len(user_ids))), 0
  while pending:          # each round either finishes users or excludes pairs, so it terminates
    for i in pending:
      try:
        chosen[i] = _fewshot(index, i, excluded)
      except ValueError as e:
        skipped[i] = str(e)
        chosen.pop(i, None)
    need = {int(p) for i in pending if i in chosen for p in chosen[i]} - decoded.keys()
    if need:
      failed += _decode(index, need, size, decoded, excluded, log)
    pending = [i for i in pending if i in chosen and any(int(p) in excluded for p in chosen[i])]

  kept = [i for i in range(len(user_ids)) if i not in skipped]
  out = np.zeros((len(kept), tokens, dim), np.float32)
  for k, i in enumerate(kept):
    pairs = [decoded[int(p)] for p in chosen[i]]
    winners = np.stack([_from_u8(px[pref]) for px, _, pref in pairs])
    losers = np.stack([_from_u8(px[1 - pref]) for px, _, pref in pairs])
    out[k] = fewshot.embed_user(winners, losers, [c for _, c, _ in pairs], tokens, dim)

  for n, (i, reason) in enumerate(skipped.items()):
    if n < _LISTED:
      log(f"embed_statistics: user {user_ids[i]} skipped: {reason}")
  if len(skipped) > _LISTED:
    log(f"embed_statistics: ... {len(skipped) - _LISTED} more users skipped")
  splits = index.users["split"][kept]
  log(f"embed_statistics: embedded {len(kept)} users ("
      + ", ".join(f"{name} {int((splits == s).sum())}" for s, name in
                  enumerate(pickapic.SPLIT_NAMES))
      + f"), skipped {len(skipped)}; {len(excluded)} pairs excluded ({failed} found here)")
  return user_ids[kept].astype(np.int64), out


# --- command line ------------------------------------------------------------------------------

def repoint_paths(index: pickapic.PickapicIndex, input_path: str) -> list[str]:
  """The index's files found again under `input_path` by name (the data moved since indexing);
  with several files of one name, the one whose fingerprint matches."""
  try:
    found = pickapic.list_files(input_path)
  except pickapic.PickapicError as e:
    raise EmbedError(str(e)) from None
  by_name = {}
  for path in found:
    by_name.setdefault(os.path.basename(path), []).append(path)
  paths = []
  for meta in index.files:
    candidates = by_name.get(meta["name"], [])
    if not candidates:
      raise EmbedError(f"--input={input_path!r}: no file named {meta['name']} (the index has "
                       f"{len(index.files)} files)")
    match = [p for p in candidates if len(candidates) == 1
             or pickapic.file_fingerprint(p) == meta]
    paths.append((match or candidates)[0])
  return paths


def load_exclusions(shard_dir: str) -> list[int]:
  """Pair positions the precompute run could not decode (SHARDS/manifest.json "skipped"); none
  when there is no manifest yet. The manifest lists at most 1000; the rest are found here."""
  path = os.path.join(shard_dir, shards.MANIFEST)
  if not storage.exists(path):
    return []
  try:
    manifest = shards.read_json(path)
    return [int(s["pair"]) for s in manifest.get("skipped", [])]
  except (shards.ShardsError, AttributeError, KeyError, TypeError, ValueError) as e:
    raise EmbedError(f"{path}: cannot read its skipped pairs ({type(e).__name__}: {e})") from None


def load_index(shard_dir: str, input_path: str | None = None) -> pickapic.PickapicIndex:
  """SHARD_DIR/index, with its parquet paths re-pointed under `input_path` when given."""
  if not storage.path(shard_dir).is_dir():
    raise EmbedError(f"{shard_dir}: no such folder")
  folder = os.path.join(shard_dir, "index")
  if not storage.exists(os.path.join(folder, "index.json")):
    raise EmbedError(f"{folder}: no saved Pick-a-Pic index (make it with "
                     "python -m ppd_jax.data.precompute)")
  try:
    index = pickapic.PickapicIndex.load(folder)
  except (OSError, ValueError, KeyError) as e:
    raise EmbedError(f"{folder}: unreadable index ({type(e).__name__}: {e})") from None
  if input_path is not None:
    index.paths = repoint_paths(index, input_path)
  return index


def run(shard_dir: str, out: str, *, tokens: int = 1, dim: int = 3584, size: int = 64,
        input_path: str | None = None, log=print) -> tuple[int, int]:
  """The CLI's work: index + exclusions -> store at `out`. Returns (embedded, skipped) users."""
  index = load_index(shard_dir, input_path)
  exclude = load_exclusions(shard_dir)
  user_ids, embeddings = embed_users(index, tokens=tokens, dim=dim, size=size, exclude=exclude,
                                     log=log)
  if not len(user_ids):
    raise EmbedError(f"{shard_dir}: no user has {index.users['fewshot'].shape[1]} decodable "
                     "few-shot pairs; nothing to write")
  try:
    store.write_store(out, user_ids, embeddings,
                      source={"embedder": EMBEDDER, "tokens": tokens, "size": size,
                              "fewshot": int(index.users["fewshot"].shape[1])})
  except (store.StoreError, OSError) as e:
    raise EmbedError(str(e)) from None
  return len(user_ids), len(index.users["user_id"]) - len(user_ids)


def _define_flags() -> None:
  """Defined only when run as a script: other CLIs' --out must not clash in one process."""
  from absl import flags
  flags.DEFINE_string("shards", None, "precompute output folder (holds index/ and manifest.json)")
  flags.DEFINE_string("out", None, "user-embedding store to write (.safetensors)")
  flags.DEFINE_integer("tokens", 1, "embedding tokens per user")
  flags.DEFINE_integer("dim", 3584, "embedding width (LLaVA-OneVision's hidden size)")
  flags.DEFINE_integer("size", 64, "image side the statistics are computed at")
  flags.DEFINE_string("input", None, "parquet folder, when the files moved since indexing")
  flags.mark_flags_as_required(["shards", "out"])


def _main(argv) -> None:
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import app
  from absl import flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    embedded, skipped = run(f.shards, f.out, tokens=f.tokens, dim=f.dim, size=f.size,
                            input_path=f.input)
  except (ValueError, OSError) as e:   # EmbedError and the readers' own errors
    sys.exit(f"ppd_jax.users.embed_statistics: {e}")
  print(f"wrote {f.out}: {embedded} users embedded, {skipped} skipped "
        f"([{f.tokens}, {f.dim}] each, embedder {EMBEDDER!r})")
  print("note: image statistics are a stand-in for smoke tests; the paper's user embedding is the "
        "VLM extraction, python -m ppd_jax.users.embed (users/vlm.py), which writes the same store")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(_main)

"""Pick-a-Pic v2 parquet files -> per-user preference pairs, filters, user splits, few-shot pairs.

Columns read (the v2 dataset card's names and types; the others are ignored):
    caption        string   the prompt both images were generated for
    user_id        int64    who labelled the pair: PPD's user
    label_0/1      float64  1/0: image 0 preferred, 0/1: image 1, 0.5/0.5: a tie
    has_label      bool     False: shown but never labelled
    are_different  bool     False: both images are the same picture
    ranking_id     int64    with the two image uids, a pair's identity (stable across mirrors)
    image_0_uid, image_1_uid  string
    jpg_0, jpg_1   binary   the JPEG bytes (read only by data/precompute.py, row group by row group)

One pass reads the small columns of every file (never the images) and builds the index: rows that
are unlabelled, ties, of two identical images or with a missing value are dropped, then users with
fewer than N = `fewshot` pairs. Users are split into training, validation and unseen-test users by
a seeded hash of their id (exact fractions, independent of file order); each user's pairs are
ordered by a seeded hash of their identity and the first N are its few-shot pairs (what the VLM
sees, users/vlm.py). A file that cannot be read, or lacks a column or has it with the wrong type,
is skipped with the file and column named; every count is kept in `report`.

--input may be a URL (gs://...): files are listed, fingerprinted and read through ppd_jax.storage
(pyarrow reads a parquet file from any seekable file object, so a bucket's is read in place).
"""
import dataclasses
import fnmatch
import glob
import hashlib
import io
import json
import os

import numpy as np

from ppd_jax import storage
from ppd_jax.data import shards

TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "validation", "test")

# column -> (kind, what the index needs it for); kinds are checked against the arrow type
COLUMNS = {
    "caption": "string", "user_id": "integer", "label_0": "number", "label_1": "number",
    "has_label": "boolean", "are_different": "boolean", "ranking_id": "integer",
    "image_0_uid": "string", "image_1_uid": "string",
}
IMAGE_COLUMNS = ("jpg_0", "jpg_1")


class PickapicError(ValueError):
  """Input that cannot be indexed at all (no readable files); the message names the path."""


def list_files(input_path: str) -> list[str]:
  """A folder (every *.parquet below it, sorted), a glob, or one file; a URL's too."""
  if storage.is_url(input_path):
    files = _list_url(input_path)
  elif os.path.isdir(input_path):
    files = glob.glob(os.path.join(input_path, "**", "*.parquet"), recursive=True)
  else:
    files = glob.glob(input_path)
  files = sorted(os.fspath(storage.path(f)) for f in files)
  if not files:
    raise PickapicError(f"--input={input_path!r}: no parquet files there")
  return files


def _list_url(url: str) -> list[str]:
  """list_files for a URL. epath refuses a recursive "**" glob there, so a folder is listed level
  by level, and a pattern is matched against the files of its (wildcard-free) parent."""
  p = storage.path(url)
  if not any(c in url for c in "*?["):
    if p.is_dir():
      return _parquet_below(p)
    return [url] if p.exists() else []
  parent, pattern = url.rstrip("/").rsplit("/", 1)
  if any(c in parent for c in "*?["):
    raise PickapicError(f"--input={url!r}: in a URL, only the file name may hold a wildcard")
  folder = storage.path(parent)
  if not folder.is_dir():
    return []
  return [os.fspath(f) for f in folder.iterdir() if fnmatch.fnmatch(f.name, pattern)]


def _parquet_below(folder) -> list[str]:
  out = []
  for child in folder.iterdir():
    if child.is_dir():
      out += _parquet_below(child)
    elif child.name.endswith(".parquet"):
      out.append(os.fspath(child))
  return out


def open_parquet(path: str):
  """A pyarrow ParquetFile of a local path or a URL (read through a seekable epath file)."""
  import pyarrow.parquet as pq
  if storage.is_url(path):
    return pq.ParquetFile(storage.path(path).open("rb"))
  return pq.ParquetFile(path)


def _kind_ok(kind: str, arrow_type) -> bool:
  import pyarrow as pa
  t = pa.types
  return {"string": t.is_string(arrow_type) or t.is_large_string(arrow_type),
          "integer": t.is_integer(arrow_type),
          "number": t.is_floating(arrow_type) or t.is_integer(arrow_type),
          "boolean": t.is_boolean(arrow_type),
          "binary": t.is_binary(arrow_type) or t.is_large_binary(arrow_type)}[kind]


def schema_problems(schema) -> list[str]:
  """What is wrong with a file's columns: missing ones and ones of the wrong type."""
  wanted = {**COLUMNS, **{c: "binary" for c in IMAGE_COLUMNS}}
  out = []
  for name, kind in wanted.items():
    if name not in schema.names:
      out.append(f"column {name!r} is missing")
    elif not _kind_ok(kind, schema.field(name).type):
      out.append(f"column {name!r} has type {schema.field(name).type}, expected {kind}")
  return out


def file_fingerprint(path: str) -> dict:
  """Size and a hash of the last MiB (parquet keeps its footer there): cheap, and it changes when
  the file's contents do, unlike a modification time that a copy resets."""
  p = storage.path(path)
  with p.open("rb") as f:
    size = f.seek(0, io.SEEK_END)
    f.seek(max(0, size - (1 << 20)))
    tail = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
  return {"name": p.name, "size": size, "tail_blake2b": tail}


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a well-spread 64-bit hash, vectorised (uint64 arithmetic wraps)."""
  x = np.asarray(x, np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seeded_hash(values: np.ndarray, seed: int, salt: int) -> np.ndarray:
  with np.errstate(over="ignore"):
    base = _mix64(np.uint64(seed) * np.uint64(2) + np.uint64(salt))
    return _mix64(np.asarray(values).astype(np.int64).view(np.uint64) ^ base)


def _string_hash(strings) -> np.ndarray:
  return np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                   for s in strings], np.uint64)


@dataclasses.dataclass
class PickapicIndex:
  """The kept pairs of kept users, ordered by (file, row), and everything decided about them.

  pairs:    dict of equal-length arrays: file_id (index into `files`), row (within the file),
            user_id, caption_id (into `captions`), preferred (0 or 1: which image won),
            ranking_id, key (the pair's seeded identity hash, which orders a user's pairs)
  users:    dict of arrays over kept users, sorted by id: user_id, split (TRAIN/VALIDATION/TEST),
            num_pairs, fewshot [U, N] (positions in `pairs`, in the user's order)
  """
  files: list[dict]                 # file_fingerprint of every readable, well-formed input file
  paths: list[str]                  # their paths on this machine
  captions: list[str]
  pairs: dict
  users: dict
  report: dict                      # counts at every filter, skipped files and why, parameters

  def split_of_pairs(self) -> np.ndarray:
    """[P] the split of each pair's user."""
    pos = np.searchsorted(self.users["user_id"], self.pairs["user_id"])
    return self.users["split"][pos]

  def user_order(self, user_id: int) -> np.ndarray:
    """Positions in `pairs` of one user's pairs, in its seeded order (few-shot pairs first)."""
    mine = np.flatnonzero(self.pairs["user_id"] == user_id)
    return mine[np.argsort(self.pairs["key"][mine], kind="stable")]

  def fewshot_pairs(self, user_id: int, exclude=()) -> np.ndarray:
    """The user's N few-shot pair positions; pairs in `exclude` (e.g. a JPEG that failed to
    decode) are replaced by the next ones in the user's order."""
    n = self.users["fewshot"].shape[1]
    excluded = set(int(e) for e in exclude)
    order = [p for p in self.user_order(user_id) if int(p) not in excluded]
    if len(order) < n:
      raise ValueError(f"user {user_id} has only {len(order)} usable pairs, fewer than {n}")
    return np.asarray(order[:n])

  # --- persistence: the index lives in the precompute output folder -------------------------
  def save(self, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    shards.commit_npz(os.path.join(folder, "pairs.npz"), self.pairs)
    shards.commit_npz(os.path.join(folder, "users.npz"), self.users)
    shards.write_json(os.path.join(folder, "captions.json"), self.captions)
    shards.write_json(os.path.join(folder, "index.json"),
                      {"files": self.files, "paths": self.paths, "report": self.report})

  @classmethod
  def load(cls, folder: str) -> "PickapicIndex":
    folder = storage.path(folder)
    meta = json.loads((folder / "index.json").read_text())
    captions = json.loads((folder / "captions.json").read_text())
    load = lambda name: dict(np.load(io.BytesIO((folder / name).read_bytes())))
    return cls(files=meta["files"], paths=meta["paths"], captions=captions,
               pairs=load("pairs.npz"), users=load("users.npz"), report=meta["report"])


def read_pairs(index: PickapicIndex, positions) -> list[dict]:
  """The JPEG bytes of some pairs (e.g. users' few-shot pairs, for the VLM), file by file and
  row group by row group: [{"pair", "user_id", "caption", "preferred", "jpg_0", "jpg_1"}] in the
  order of `positions`."""
  positions = np.asarray(positions, np.int64)
  out = [None] * len(positions)
  p = index.pairs
  for f in np.unique(p["file_id"][positions]):
    pf = open_parquet(index.paths[f])
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    mine = np.flatnonzero(p["file_id"][positions] == f)
    groups = np.searchsorted(starts, p["row"][positions[mine]], side="right") - 1
    for g in np.unique(groups):
      sel = mine[groups == g]
      table = pf.read_row_group(int(g), columns=list(IMAGE_COLUMNS))
      local = p["row"][positions[sel]] - starts[g]
      jpgs = [table.column(c).take(local).to_pylist() for c in IMAGE_COLUMNS]
      for i, k in enumerate(sel):
        pos = positions[k]
        out[k] = {"pair": int(pos), "user_id": int(p["user_id"][pos]),
                  "caption": index.captions[p["caption_id"][pos]],
                  "preferred": int(p["preferred"][pos]), "jpg_0": jpgs[0][i], "jpg_1": jpgs[1][i]}
  return out


def _read_columns(path: str):
  """The index's columns of one file, or (None, reason) if the file is unusable."""
  try:
    pf = open_parquet(path)
  except Exception as e:  # pyarrow raises several types for empty or corrupt files
    return None, f"{path}: not a readable parquet file ({type(e).__name__}: {e})"
  problems = schema_problems(pf.schema_arrow)
  if problems:
    return None, f"{path}: " + "; ".join(problems)
  try:
    return pf.read(columns=list(COLUMNS)), None
  except Exception as e:
    return None, f"{path}: cannot read columns ({type(e).__name__}: {e})"


def build_index(input_path: str, *, fewshot: int = 4, validation_fraction: float = 0.05,
                test_fraction: float = 0.1, seed: int = 0, log=print) -> PickapicIndex:
  """One pass over the files' small columns -> the PickapicIndex (see the module docstring)."""
  paths = list_files(input_path)
  counts = {"files": len(paths), "files_skipped": 0, "rows_read": 0, "rows_missing_values": 0,
            "rows_unlabeled": 0, "rows_bad_label": 0, "rows_tie": 0, "rows_same_image": 0}
  skipped, files, kept_paths, columns, caption_lists = [], [], [], [], []
  for path in paths:
    table, problem = _read_columns(path)
    if problem:
      skipped.append(problem)
      counts["files_skipped"] += 1
      log(f"pickapic: skipping {problem}")
      continue
    file_id = len(files)
    files.append(file_fingerprint(path))
    kept_paths.append(path)
    counts["rows_read"] += table.num_rows
    keep, values = _filter_rows(table, counts)
    rows = np.flatnonzero(keep)
    columns.append({"file_id": np.full(len(rows), file_id, np.int32), "row": rows.astype(np.int64),
                    **{k: v[rows] for k, v in values.items()}})
    caption_lists.append([values["caption"][r] for r in rows])
  if not files:
    raise PickapicError(f"--input={input_path!r}: none of the {len(paths)} parquet files is "
                        "usable:\n  " + "\n  ".join(skipped))

  cat = {k: np.concatenate([c[k] for c in columns]) for k in columns[0] if k != "caption"}
  all_captions = [c for lst in caption_lists for c in lst]
  captions = sorted(set(all_captions))
  caption_id = {c: i for i, c in enumerate(captions)}
  counts["pairs_valid"] = len(cat["user_id"])

  # A pair's identity: ranking id and both image uids, so the order is the same in any mirror.
  identity = _string_hash([f"{r}|{a}|{b}" for r, a, b in zip(
      cat["ranking_id"], cat.pop("image_0_uid"), cat.pop("image_1_uid"))])
  pairs = {"file_id": cat["file_id"], "row": cat["row"], "user_id": cat["user_id"].astype(np.int64),
           "caption_id": np.array([caption_id[c] for c in all_captions], np.int32),
           "preferred": cat["preferred"].astype(np.int8),
           "ranking_id": cat["ranking_id"].astype(np.int64),
           "key": seeded_hash(identity.view(np.int64), seed, salt=1)}

  ids, per_user = np.unique(pairs["user_id"], return_counts=True)
  counts["users_with_valid_pairs"] = len(ids)
  kept_users = ids[per_user >= fewshot]
  counts["users_below_fewshot"] = int((per_user < fewshot).sum())
  counts["pairs_of_users_below_fewshot"] = int(per_user[per_user < fewshot].sum())
  in_kept = np.isin(pairs["user_id"], kept_users)
  pairs = {k: v[in_kept] for k, v in pairs.items()}
  used = np.unique(pairs["caption_id"])              # drop captions only dropped users had
  remap = np.full(len(captions), -1, np.int32)
  remap[used] = np.arange(len(used), dtype=np.int32)
  pairs["caption_id"] = remap[pairs["caption_id"]]
  captions = [captions[i] for i in used]

  users = _split_users(kept_users, per_user[per_user >= fewshot], validation_fraction,
                       test_fraction, seed)
  users["fewshot"] = _fewshot(pairs, users["user_id"], fewshot)
  counts.update({"users": len(kept_users), "pairs": len(pairs["user_id"]),
                 "captions": len(captions)})
  split = users["split"][np.searchsorted(users["user_id"], pairs["user_id"])]
  for s, name in enumerate(SPLIT_NAMES):
    counts[f"users_{name}"] = int((users["split"] == s).sum())
    counts[f"pairs_{name}"] = int((split == s).sum())
  report = {"counts": counts, "skipped_files": skipped,
            "inputs": [file_fingerprint(p) for p in paths],
            "parameters": {"fewshot": fewshot, "validation_fraction": validation_fraction,
                           "test_fraction": test_fraction, "seed": seed}}
  log(format_report(report))
  return PickapicIndex(files=files, paths=kept_paths, captions=captions, pairs=pairs,
                       users=users, report=report)


def _filter_rows(table, counts: dict):
  """Keep-mask over one file's rows and its columns as numpy; counts what each filter drops."""
  cols = {name: table.column(name) for name in COLUMNS}
  present = np.ones(table.num_rows, bool)
  for col in cols.values():
    present &= ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
  counts["rows_missing_values"] += int((~present).sum())
  # Nulls become harmless values before conversion (an integer column with a null would
  # otherwise come back as float64 and lose ids above 2^53); those rows are dropped anyway.
  fill = {"string": "", "integer": 0, "number": 0.0, "boolean": False}
  values = {name: cols[name].fill_null(fill[kind]).to_numpy(zero_copy_only=False)
            for name, kind in COLUMNS.items()}

  has_label = present & values["has_label"].astype(bool)
  counts["rows_unlabeled"] += int((present & ~has_label).sum())
  l0 = values["label_0"].astype(np.float64)
  l1 = values["label_1"].astype(np.float64)
  tie = has_label & (l0 == l1)
  counts["rows_tie"] += int(tie.sum())
  decided = has_label & ~tie
  good_label = decided & (((l0 == 1) & (l1 == 0)) | ((l0 == 0) & (l1 == 1)))
  counts["rows_bad_label"] += int((decided & ~good_label).sum())
  different = good_label & values["are_different"].astype(bool)
  counts["rows_same_image"] += int((good_label & ~different).sum())
  values["preferred"] = np.where(l0 == 1, 0, 1)
  values["user_id"] = values["user_id"].astype(np.int64)
  values["ranking_id"] = values["ranking_id"].astype(np.int64)
  return different, values


def _split_users(user_ids, num_pairs, validation_fraction, test_fraction, seed) -> dict:
  """Exact fractions of users, chosen by a seeded hash of the id: test first, then validation."""
  n = len(user_ids)
  order = np.argsort(seeded_hash(user_ids, seed, salt=2), kind="stable")
  n_test = int(round(test_fraction * n))
  n_val = int(round(validation_fraction * n))
  split = np.full(n, TRAIN, np.int8)
  split[order[:n_test]] = TEST
  split[order[n_test:n_test + n_val]] = VALIDATION
  return {"user_id": user_ids.astype(np.int64), "split": split,
          "num_pairs": num_pairs.astype(np.int64)}


def _fewshot(pairs: dict, user_ids: np.ndarray, n: int) -> np.ndarray:
  """[U, n] positions of each user's first n pairs by the seeded pair key."""
  order = np.lexsort((pairs["key"], pairs["user_id"]))      # by user, then key
  users_sorted = pairs["user_id"][order]
  starts = np.searchsorted(users_sorted, user_ids)
  return order[starts[:, None] + np.arange(n)[None, :]].astype(np.int64)


def format_report(report: dict) -> str:
  """Counts at each filter, one line each, for the log and the manifest."""
  c = report["counts"]
  lines = [
      f"pickapic: {c['files']} files ({c['files_skipped']} skipped), {c['rows_read']} rows",
      f"  - {c['rows_missing_values']} with a missing value",
      f"  - {c['rows_unlabeled']} unlabeled (has_label false)",
      f"  - {c['rows_tie']} ties",
      f"  - {c['rows_bad_label']} with labels other than 0/1",
      f"  - {c['rows_same_image']} of two identical images (are_different false)",
      f"  = {c['pairs_valid']} pairs of {c['users_with_valid_pairs']} users",
      f"  - {c['pairs_of_users_below_fewshot']} pairs of {c['users_below_fewshot']} users with "
      f"fewer than {report['parameters']['fewshot']} pairs",
      f"  = {c['pairs']} pairs of {c['users']} users, {c['captions']} unique captions",
  ]
  for name in SPLIT_NAMES:
    lines.append(f"    {name}: {c[f'users_{name}']} users, {c[f'pairs_{name}']} pairs")
  return "\n".join(lines)

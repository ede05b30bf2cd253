"""The precompute output folder: what is in it, how it is written safely, and how it is read.

    SHARDS/settings.json          what the folder is being made with (checked by every rerun)
    SHARDS/index/                 the Pick-a-Pic index (data/pickapic.py)
    SHARDS/text/{key}-{k}.npy     text conditioning of captions [k*C, (k+1)*C): stored once per
                                  caption, never per pair; read memory-mapped
    SHARDS/pairs/{split}-{u}.array_record   the pairs of input file u, one record per pair
    SHARDS/done/{unit}.json       a finished unit: its files, counts, sha256 checksums
    SHARDS/records-{split}.npz    per record: pair, user_id, caption_id (for joins without reads)
    SHARDS/manifest.json          written last, when every unit is done

Every file is written under a temporary name, fsynced and renamed, and a unit's done-file is
written only after all its files are in place. A killed run leaves at most temporary files, which
the rerun of their unit deletes; a unit without a done-file (or whose files no longer match it)
is redone.

The JSON and .npz helpers and done-files also take URLs (ppd_jax.storage), for the folders that
other commands write with them (data/relabel.py --out): an object appears only once its upload
is complete, so it is written directly and nothing half-written is ever left to delete. The
shard folder itself stays local (precompute.py says why).
"""
import glob
import hashlib
import io
import json
import os

import numpy as np

from ppd_jax import storage

MANIFEST = "manifest.json"
SETTINGS = "settings.json"
FORMAT = "ppd_jax.pickapic_shards"
VERSION = 1


class ShardsError(ValueError):
  """A shard folder that cannot be used; the message names the folder or file."""


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _fsync_dir(folder: str) -> None:
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def commit(tmp: str, path: str) -> dict:
  """fsync a finished temporary file and rename it into place; its size and checksum."""
  with open(tmp, "rb+") as f:
    os.fsync(f.fileno())
  info = {"file": os.path.basename(path), "bytes": os.path.getsize(tmp), "sha256": sha256(tmp)}
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(os.path.abspath(path)))   # "" for a bare file name
  return info


def temporary(path: str) -> str:
  """Where `path` is written before it is committed: unique per process, so jobs sharing a
  folder never write or rename each other's temporaries."""
  return f"{path}.{os.getpid()}.tmp"


def _upload(path: str, data: bytes) -> dict:
  """commit() for a URL: the object, with the same size and checksum entry."""
  storage.write_bytes(path, data)
  return {"file": storage.path(path).name, "bytes": len(data),
          "sha256": hashlib.sha256(data).hexdigest()}


def write_json(path: str, obj) -> None:
  if storage.is_url(path):
    _upload(path, json.dumps(obj, indent=1, sort_keys=True).encode())
    return
  tmp = temporary(path)
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  commit(tmp, path)


def read_json(path: str):
  try:
    return json.loads(storage.read_text(path))
  except (OSError, ValueError) as e:
    raise ShardsError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def remove_temporaries(folder: str, *patterns: str) -> int:
  """Deletes what a killed run left half-written of some outputs (glob patterns relative to
  `folder`, e.g. one unit's files: only its owner writes them); returns how many. In a bucket
  there are none: an object exists only once its upload is complete."""
  if storage.is_url(folder):
    return 0
  stale = [p for pattern in patterns
           for p in glob.glob(os.path.join(folder, pattern + ".*tmp"))]
  for path in stale:
    os.remove(path)
  return len(stale)


class RecordWriter:
  """Streams records into an ArrayRecord file under a temporary name; `close` commits it.

  group_size:1 makes every record its own chunk, so random access reads one record, not a group.
  """

  def __init__(self, path: str):
    from array_record.python import array_record_module
    self.path, self.tmp, self.count = path, temporary(path), 0
    self._writer = array_record_module.ArrayRecordWriter(self.tmp, "group_size:1")

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self.count += 1

  def close(self) -> dict:
    self._writer.close()
    return {**commit(self.tmp, self.path), "count": self.count}


def unit_done(folder: str, unit: str, verify: bool = True) -> dict | None:
  """The done-file of a unit if it and every file it lists are intact, else None."""
  if storage.is_url(folder):
    return _url_unit_done(folder, unit, verify)
  path = os.path.join(folder, "done", f"{unit}.json")
  if not os.path.exists(path):
    return None
  try:
    done = read_json(path)
  except ShardsError:
    return None
  for info in done["files"]:
    target = os.path.join(folder, info["dir"], info["file"])
    if not os.path.exists(target) or os.path.getsize(target) != info["bytes"]:
      return None
    if verify and sha256(target) != info["sha256"]:
      return None
  return done


def _url_unit_done(folder: str, unit: str, verify: bool) -> dict | None:
  """unit_done in a bucket: the same checks, on the objects' sizes and bytes."""
  root = storage.path(folder)
  path = root / "done" / f"{unit}.json"
  if not path.exists():
    return None
  try:
    done = read_json(os.fspath(path))
  except ShardsError:
    return None
  for info in done["files"]:
    target = root / info["dir"] / info["file"]
    if not target.exists() or target.stat().length != info["bytes"]:
      return None
    if verify and hashlib.sha256(target.read_bytes()).hexdigest() != info["sha256"]:
      return None
  return done


def mark_done(folder: str, unit: str, done: dict) -> None:
  storage.makedirs(os.path.join(folder, "done"))
  write_json(os.path.join(folder, "done", f"{unit}.json"), done)


def save_npy(path: str, array: np.ndarray) -> dict:
  if storage.is_url(path):
    buf = io.BytesIO()
    np.save(buf, array)
    return _upload(path, buf.getvalue())
  tmp = temporary(path)
  with open(tmp, "wb") as f:
    np.save(f, array)
  return commit(tmp, path)


def commit_npz(path: str, arrays: dict) -> dict:
  if storage.is_url(path):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return _upload(path, buf.getvalue())
  tmp = temporary(path)
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  return commit(tmp, path)


def read_npz(path: str) -> dict:
  """Every array of an .npz file, local or at a URL, as a dict."""
  if storage.is_url(path):
    return dict(np.load(io.BytesIO(storage.read_bytes(path))))
  return dict(np.load(path))


def read_manifest(folder: str) -> dict:
  """The manifest of a finished folder, or a ShardsError saying what is missing."""
  path = os.path.join(folder, MANIFEST)
  if not storage.path(folder).is_dir():
    raise ShardsError(f"{folder}: no such folder (make it with python -m ppd_jax.data.precompute)")
  if not storage.exists(path):
    raise ShardsError(f"{path} is missing: the precompute run that writes {folder} has not "
                      "finished; rerun it (it resumes where it stopped)")
  manifest = read_json(path)
  if manifest.get("format") != FORMAT:
    raise ShardsError(f"{path}: not a ppd_jax shard manifest (format {manifest.get('format')!r})")
  return manifest


class TextStore:
  """Caption id -> text conditioning arrays, from memory-mapped chunk files."""

  def __init__(self, folder: str, manifest: dict):
    self.folder, self.chunk = folder, manifest["text"]["chunk"]
    self.keys = tuple(manifest["text"]["keys"])
    self.num_chunks = manifest["text"]["num_chunks"]
    self._maps = {}

  def _map(self, key: str, k: int) -> np.ndarray:
    if (key, k) not in self._maps:
      path = os.path.join(self.folder, "text", f"{key}-{k:05d}.npy")
      self._maps[key, k] = np.load(path, mmap_mode="r")
    return self._maps[key, k]

  def get(self, caption_ids: np.ndarray) -> dict:
    """[B] caption ids -> {key: [B, ...] float32}."""
    ids = np.asarray(caption_ids, np.int64)
    chunk, pos = ids // self.chunk, ids % self.chunk
    out = {}
    for key in self.keys:
      first = self._map(key, 0)
      arr = np.empty((len(ids),) + first.shape[1:], np.float32)
      for k in np.unique(chunk):
        sel = chunk == k
        arr[sel] = self._map(key, int(k))[pos[sel]]
      out[key] = arr
    return out

  def __getstate__(self):
    return {**self.__dict__, "_maps": {}}     # workers re-open the maps

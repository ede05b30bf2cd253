"""User-embedding store: one safetensors file holding every user's [tokens, dim] embedding(s).

The VLM extraction (users/embed.py) writes it once, offline; the data loader joins it with every
training pair of that user. A user may have several entries, each made from a different 4-shot
sample of its pairs (the probe of Fig. 2 needs them); training and sampling use sample 0, the
one made from the few-shot pairs the data reader recorded (data/pickapic.py). Pick-a-Pic user ids
are arbitrary int64s, so entries are kept sorted and lookups are a binary search.

Layout (version 2; safetensors, little endian; E entries, U <= E users):
  user_ids         int64 [E]     sorted; each user's entries are adjacent
  samples          int32 [E]     0, 1, ... within a user; every user has sample 0
  shot_ids         int64 [E, N]  ids of the pairs the entry was made from (for Pick-a-Pic the
                                 pairs' positions in the index, data/pickapic.py; for a JSONL
                                 file its "pair_id" or 0-based line); N = 0 when unknown
  embeddings       float16 or float32 [E, T, D]
  profile_offsets  int64 [E + 1] and profile_bytes uint8 [bytes], optional: entry e's generated
                   profile text is profile_bytes[offsets[e]:offsets[e + 1]] in UTF-8
  metadata         "format": "ppd_jax.user_embeddings"; "version", "tokens", "dim", "shots":
                   JSON ints; "source": JSON object from the producer (model id, prompt template
                   and its version, decoding settings, layers kept, ...).
Version 1 files (one entry per user, profiles as a JSON list in the metadata) are still read.

The reader parses the header itself and memory-maps embeddings and profile text, so the Grain
worker processes that re-open the file share the page cache instead of each holding a copy.

A store may live at a URL (gs://...): data/user_store_file.py writes and fetches its bytes.
"""
import json
import os
import struct

import numpy as np

from ppd_jax.data import user_store_file as store_file

FORMAT = "ppd_jax.user_embeddings"
VERSION = 2
_READABLE = (1, 2)
_STORED = {"F16": np.float16, "F32": np.float32}
_ITEMSIZE = {"I64": 8, "F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1}
_MAX_HEADER = 100 * 2**20          # safetensors' own limit; a bigger "length" is not a header
_CHECK_CHUNK = 1024                # users per finiteness check, to bound the temporary mask


class StoreError(ValueError):
  """A store that cannot be written or read as asked; the message always names the file."""


def _first(ids, n: int = 10) -> str:
  ids = [int(i) for i in ids]
  more = f", ... ({len(ids) - n} more)" if len(ids) > n else ""
  return ", ".join(map(str, ids[:n])) + more


def _as_ids(user_ids, where: str) -> np.ndarray:
  """Any integer array-like -> int64, refusing floats and bools that would silently cast."""
  ids = np.asarray(user_ids)
  if ids.dtype.kind not in "iu" and not (ids.size == 0 and ids.dtype.kind == "f"):
    raise TypeError(f"{where}: user ids must be integers, got dtype {ids.dtype}")
  if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
    raise TypeError(f"{where}: user id {ids.max()} does not fit in int64")
  return ids.astype(np.int64)


def _storage_dtype(dtype: np.dtype):
  """float16/float32 are kept; other floats (bfloat16, float64) become float32, which the reader
  returns anyway, so no store ever holds a dtype it cannot memory-map."""
  if dtype in (np.float16, np.float32):
    return dtype
  if dtype.kind == "f" or dtype.name == "bfloat16":
    return np.dtype(np.float32)
  return None


def _encode_profiles(path: str, profiles, entries: int) -> tuple[np.ndarray, np.ndarray]:
  """Profile strings -> (offsets int64 [E + 1], UTF-8 bytes uint8 [total])."""
  profiles = list(profiles)
  if len(profiles) != entries:
    raise StoreError(f"{path}: {len(profiles)} profiles for {entries} entries")
  if not all(isinstance(p, str) for p in profiles):
    raise StoreError(f"{path}: profiles must be strings")
  blobs = [p.encode("utf-8") for p in profiles]
  offsets = np.zeros(entries + 1, np.int64)
  np.cumsum([len(b) for b in blobs], out=offsets[1:])
  return offsets, np.frombuffer(b"".join(blobs), np.uint8)


def write_store(path, user_ids, embeddings, *, samples=None, shot_ids=None, profiles=None,
                source=None) -> None:
  """Validates and writes a store atomically: a crash never leaves a half-written file at path.

  user_ids [E] with samples [E] (default all 0: one entry per user) name the entries; every user
  needs a sample-0 entry and no (user, sample) may repeat. shot_ids [E, N] and profiles [E] are
  optional. Entries are sorted by (user id, sample) on the way in.
  """
  path = os.fspath(path)
  ids = np.asarray(user_ids)
  if ids.ndim != 1 or ids.dtype.kind not in "iu":
    raise StoreError(f"{path}: user_ids must be a 1-D integer array, got shape {ids.shape} "
                     f"dtype {ids.dtype}")
  if ids.size == 0:
    raise StoreError(f"{path}: no users to store")
  try:
    ids = _as_ids(ids, path)
  except TypeError as e:
    raise StoreError(str(e)) from None
  entries = ids.size
  samples = np.zeros(entries, np.int64) if samples is None else np.asarray(samples)
  if samples.shape != (entries,) or samples.dtype.kind not in "iu" or (samples < 0).any():
    raise StoreError(f"{path}: samples must be {entries} non-negative integers, got shape "
                     f"{samples.shape} dtype {samples.dtype}")
  samples = samples.astype(np.int64)
  key = np.stack([ids, samples], axis=1)
  uniq, counts = np.unique(key, axis=0, return_counts=True)
  if (counts > 1).any():
    dup = uniq[counts > 1]
    what = "user ids" if (samples == 0).all() else "(user id, sample) entries"
    raise StoreError(f"{path}: duplicate {what}: "
                     + (_first(dup[:, 0]) if what == "user ids" else str(dup[:10].tolist())))
  lacking = np.setdiff1d(ids, ids[samples == 0])
  if lacking.size:
    raise StoreError(f"{path}: users without a sample-0 entry (the one training uses): "
                     f"{_first(lacking)}")
  shots = np.zeros((entries, 0), np.int64) if shot_ids is None else np.asarray(shot_ids)
  if shots.ndim != 2 or shots.shape[0] != entries or (shots.size and shots.dtype.kind not in "iu"):
    raise StoreError(f"{path}: shot_ids must be an integer array [entries={entries}, shots], got "
                     f"shape {shots.shape} dtype {shots.dtype}")

  emb = np.asarray(embeddings)
  if emb.ndim != 3 or emb.shape[0] != entries or 0 in emb.shape:
    raise StoreError(f"{path}: embeddings must be [entries={entries}, tokens, dim] with tokens, "
                     f"dim > 0, got shape {emb.shape}")
  dtype = _storage_dtype(emb.dtype)
  if dtype is None:
    raise StoreError(f"{path}: embeddings must be floating point, got dtype {emb.dtype}")
  bad = [start + np.flatnonzero(~np.isfinite(emb[start:start + _CHECK_CHUNK]).all(axis=(1, 2)))
         for start in range(0, entries, _CHECK_CHUNK)]
  bad = np.concatenate(bad)
  if bad.size:
    raise StoreError(f"{path}: non-finite embedding for user id {ids[bad[0]]} "
                     f"({bad.size} entries affected, users {_first(np.unique(ids[bad]))})")
  try:
    source_json = json.dumps(dict(source or {}))
  except (TypeError, ValueError) as e:
    raise StoreError(f"{path}: source must be a JSON-serialisable dict: {e}") from None

  profile_table = None if profiles is None else _encode_profiles(path, profiles, entries)

  order = np.lexsort((samples, ids))
  if (order != np.arange(entries)).any():
    ids, samples, shots, emb = ids[order], samples[order], shots[order], emb[order]
    if profile_table is not None:
      profile_table = _encode_profiles(path, [list(profiles)[i] for i in order], entries)
  _, tokens, dim = emb.shape
  metadata = {"format": FORMAT, "version": str(VERSION), "tokens": str(tokens), "dim": str(dim),
              "shots": str(shots.shape[1]), "source": source_json}
  tensors = {"user_ids": np.ascontiguousarray(ids),
             "samples": samples.astype(np.int32),
             "shot_ids": np.ascontiguousarray(shots, dtype=np.int64),
             "embeddings": np.ascontiguousarray(emb, dtype=dtype)}
  if profile_table is not None:
    tensors["profile_offsets"], tensors["profile_bytes"] = profile_table
  store_file.write_atomically(path, tensors, metadata)


def _read_header(path: str, name: str | None = None) -> tuple[dict, int, int]:
  """-> (header JSON, byte offset where tensor data starts, file size). Raises StoreError naming
  `name` (default: path)."""
  shown = path if name is None else name
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
      if n < 2 or n > min(_MAX_HEADER, size - 8):
        raise StoreError(f"{shown}: not a safetensors file (bad header length)")
      header = json.loads(f.read(n))
  except FileNotFoundError:
    raise StoreError(f"{shown}: user-embedding store not found") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise StoreError(f"{shown}: not a readable safetensors file: {e}") from None
  if not isinstance(header, dict):
    raise StoreError(f"{shown}: not a safetensors file (header is not an object)")
  return header, 8 + n, size


class UserEmbeddingStore:
  """Read side of a store: header, ids and shot ids at init; embeddings and profile text
  memory-mapped on first use. Lookups by user id (store[uid], get_many, profile) return the
  user's sample-0 entry; user_ids / samples / shot_ids / embeddings list every entry.

  Pickles as its path only, so a Grain worker re-opens the file rather than receiving a copy of
  every embedding through the pipe.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    try:
      self._file = store_file.local_copy(self.path)
    except FileNotFoundError:
      raise StoreError(f"{self.path}: user-embedding store not found") from None
    except OSError as e:
      raise StoreError(f"{self.path}: cannot be read ({type(e).__name__}: {e})") from None
    header, data_start, size = _read_header(self._file, self.path)
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != FORMAT:
      raise StoreError(f"{self.path}: not a user-embedding store (format tag "
                       f"{meta.get('format')!r}, expected {FORMAT!r})")
    try:
      self.version = int(meta["version"])
      self.tokens, self.dim = int(meta["tokens"]), int(meta["dim"])
      self.source = json.loads(meta.get("source", "{}"))
      v1_profiles = json.loads(meta["profiles"]) if "profiles" in meta else None
    except (KeyError, ValueError) as e:
      raise StoreError(f"{self.path}: malformed store metadata: {e!r}") from None
    if self.version not in _READABLE:
      raise StoreError(f"{self.path}: store version {self.version}, this code reads "
                       f"{', '.join(map(str, _READABLE))}")
    info = lambda name: self._tensor_info(header, name, data_start, size)
    ids_info, emb_info = info("user_ids"), info("embeddings")
    if ids_info["dtype"] != "I64" or len(ids_info["shape"]) != 1:
      raise StoreError(f"{self.path}: user_ids must be int64 [E], got {ids_info['dtype']} "
                       f"{ids_info['shape']}")
    entries = ids_info["shape"][0]
    if entries == 0:
      raise StoreError(f"{self.path}: store has no users")
    if emb_info["dtype"] not in _STORED or emb_info["shape"] != [entries, self.tokens, self.dim]:
      raise StoreError(f"{self.path}: embeddings are {emb_info['dtype']} {emb_info['shape']}, "
                       f"expected F16/F32 {[entries, self.tokens, self.dim]}")
    self.dtype = np.dtype(_STORED[emb_info["dtype"]])
    self._emb_offset = emb_info["offset"]
    self._emb = None
    self.user_ids = self._read(ids_info, "<i8", entries).astype(np.int64)
    self._profile_info = None
    self._v1_profiles = None
    if self.version == 1:
      self.samples = np.zeros(entries, np.int64)
      self.shot_ids = np.zeros((entries, 0), np.int64)
      if v1_profiles is not None and len(v1_profiles) != entries:
        raise StoreError(f"{self.path}: {len(v1_profiles)} profiles for {entries} users")
      self._v1_profiles = v1_profiles
    else:
      self._read_v2_tables(header, info, entries)
    self._check_order()

  def _read_v2_tables(self, header: dict, info, entries: int) -> None:
    samples, shots = info("samples"), info("shot_ids")
    if samples["dtype"] != "I32" or samples["shape"] != [entries]:
      raise StoreError(f"{self.path}: samples must be int32 [{entries}]")
    if shots["dtype"] != "I64" or len(shots["shape"]) != 2 or shots["shape"][0] != entries:
      raise StoreError(f"{self.path}: shot_ids must be int64 [{entries}, N]")
    self.samples = self._read(samples, "<i4", entries).astype(np.int64)
    self.shot_ids = self._read(shots, "<i8", entries * shots["shape"][1]).reshape(shots["shape"])
    if "profile_offsets" in header:
      offsets, blob = info("profile_offsets"), info("profile_bytes")
      if offsets["dtype"] != "I64" or offsets["shape"] != [entries + 1] or blob["dtype"] != "U8":
        raise StoreError(f"{self.path}: profile_offsets must be int64 [{entries + 1}] with "
                         "uint8 profile_bytes")
      self._profile_info = (offsets, blob)

  def _read(self, info: dict, dtype: str, count: int) -> np.ndarray:
    return np.fromfile(self._file, dtype=dtype, count=count, offset=info["offset"])

  def _check_order(self) -> None:
    """Entries sorted by (user, sample), each user with a sample-0 entry -> the primary rows."""
    ids, samples = self.user_ids, self.samples
    same = np.diff(ids) == 0
    if (np.diff(ids) < 0).any() or (np.diff(samples)[same] <= 0).any():
      raise StoreError(f"{self.path}: entries are not sorted by (user id, sample) without "
                       "repeats" if self.version > 1 else
                       f"{self.path}: user_ids are not strictly increasing")
    self._primary = np.flatnonzero(samples == 0)
    self.users = ids[self._primary]                  # distinct user ids, increasing
    if self.users.size != np.unique(ids).size:
      raise StoreError(f"{self.path}: users without a sample-0 entry: "
                       f"{_first(np.setdiff1d(ids, self.users))}")

  def _tensor_info(self, header: dict, name: str, data_start: int, size: int) -> dict:
    """Checks one tensor's header entry against the file; returns dtype, shape, absolute offset."""
    info = header.get(name)
    try:
      dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
      itemsize = _ITEMSIZE.get(dtype, 0)
      ok = end - begin == itemsize * int(np.prod(shape)) and data_start + end <= size
    except (TypeError, KeyError, ValueError):
      ok = False
    if not ok:
      raise StoreError(f"{self.path}: missing or malformed tensor {name!r} in the header")
    return {"dtype": dtype, "shape": shape, "offset": data_start + begin}

  @property
  def embeddings(self) -> np.ndarray:
    """All entries' embeddings [E, T, D] in the stored dtype, read-only and memory-mapped."""
    if self._emb is None:
      self._emb = np.memmap(self._file, dtype=self.dtype.newbyteorder("<"), mode="r",
                            offset=self._emb_offset, shape=(len(self), self.tokens, self.dim))
    return self._emb

  @property
  def num_users(self) -> int:
    return int(self.users.size)

  @property
  def num_entries(self) -> int:
    return int(self.user_ids.size)

  @property
  def has_profiles(self) -> bool:
    return self._profile_info is not None or self._v1_profiles is not None

  def __len__(self) -> int:
    """Entries (rows of `embeddings`); equal to num_users when each user has one."""
    return self.num_entries

  def __repr__(self) -> str:
    return (f"UserEmbeddingStore({self.path!r}, users={self.num_users}, "
            f"entries={self.num_entries}, tokens={self.tokens}, dim={self.dim}, "
            f"dtype={self.dtype})")

  def _index(self, user_id) -> int:
    """Row of user_id's sample-0 entry, or -1 when absent (non-integer keys are simply absent)."""
    if isinstance(user_id, (bool, np.bool_)) or not isinstance(user_id, (int, np.integer)):
      return -1
    if not np.iinfo(np.int64).min <= int(user_id) <= np.iinfo(np.int64).max:
      return -1
    i = int(np.searchsorted(self.users, user_id))
    return int(self._primary[i]) if i < self.users.size and self.users[i] == user_id else -1

  def __contains__(self, user_id) -> bool:
    return self._index(user_id) >= 0

  def __getitem__(self, user_id) -> np.ndarray:
    """One user's (sample-0) embedding, [T, D] float32 (a fresh, writable copy)."""
    i = self._index(user_id)
    if i < 0:
      raise KeyError(f"user id {user_id!r} is not in the user-embedding store {self.path}")
    return np.array(self.embeddings[i], dtype=np.float32)

  def get_many(self, user_ids) -> np.ndarray:
    """Sample-0 embeddings of a batch of user ids ([B] -> [B, T, D] float32), one gather."""
    ids = _as_ids(user_ids, self.path)
    pos = np.minimum(np.searchsorted(self.users, ids), self.users.size - 1)
    absent = self.users[pos] != ids
    if absent.any():
      gone = np.unique(ids[absent])
      raise KeyError(f"{gone.size} user id(s) not in the user-embedding store {self.path}: "
                     f"{_first(gone)}")
    return np.asarray(self.embeddings[self._primary[pos]], dtype=np.float32)   # not a memmap

  def missing(self, user_ids) -> np.ndarray:
    """The distinct ids among user_ids that the store lacks, sorted (for a loader's pre-check)."""
    return np.setdiff1d(_as_ids(user_ids, self.path), self.users)

  def rows_of(self, user_id) -> np.ndarray:
    """Every entry row of one user (sample 0 first); empty when absent."""
    lo = np.searchsorted(self.user_ids, user_id, side="left")
    hi = np.searchsorted(self.user_ids, user_id, side="right")
    return np.arange(lo, hi)

  def profile(self, user_id) -> str | None:
    """The generated profile text of a user's sample-0 entry; None when the store has none."""
    i = self._index(user_id)
    if i < 0:
      raise KeyError(f"user id {user_id!r} is not in the user-embedding store {self.path}")
    return self.profile_of_row(i)

  def profile_of_row(self, row: int) -> str | None:
    """The profile text of entry `row`, read from the memory-mapped bytes."""
    if self._v1_profiles is not None:
      return self._v1_profiles[row]
    if self._profile_info is None:
      return None
    offsets, blob = self._profile_info
    lo, hi = np.fromfile(self._file, dtype="<i8", count=2, offset=offsets["offset"] + 8 * row)
    with open(self._file, "rb") as f:
      f.seek(blob["offset"] + int(lo))
      return f.read(int(hi - lo)).decode("utf-8")

  def __getstate__(self) -> dict:
    return {"path": self.path}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["path"])


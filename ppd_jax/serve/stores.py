"""What the web demo keeps between requests, each bounded: images by bytes, pair sets and the
base-image cache by count, users on disk by count and bytes (oldest evicted first).

Every key is an id this server made (32 hex digits), so nothing the browser sends becomes a path.
"""
import collections
import io
import os
import re
import threading
import uuid

import numpy as np

ID = re.compile(r"^[0-9a-f]{32}$")


def new_id() -> str:
  return uuid.uuid4().hex


class Bounded:
  """The newest `limit` entries (an LRU by insertion); thread-safe (routes and the worker)."""

  def __init__(self, limit: int):
    self._items, self._limit, self._lock = collections.OrderedDict(), limit, threading.Lock()

  def put(self, key, value) -> None:
    with self._lock:
      self._items[key] = value
      self._items.move_to_end(key)
      while len(self._items) > self._limit:
        self._items.popitem(last=False)

  def add(self, value) -> str:
    key = new_id()
    self.put(key, value)
    return key

  def get(self, key):
    """The entry, or None for an unknown key (a malformed id is never looked up)."""
    if isinstance(key, str) and not ID.match(key):
      return None
    with self._lock:
      return self._items.get(key)

  def __len__(self) -> int:
    return len(self._items)


class ImageStore:
  """PNG files by id, at most `max_bytes` of them in all; the oldest go first."""

  def __init__(self, max_bytes: int):
    self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
    self.max_bytes, self.bytes, self._lock = max_bytes, 0, threading.Lock()

  def put(self, png: bytes) -> str:
    if len(png) > self.max_bytes:
      raise ValueError(f"an image of {len(png)} bytes is over the image store's "
                       f"{self.max_bytes} bytes")
    key = new_id()
    with self._lock:
      self._items[key] = png
      self.bytes += len(png)
      while self.bytes > self.max_bytes:
        _, old = self._items.popitem(last=False)
        self.bytes -= len(old)
    return key

  def get(self, key: str) -> bytes | None:
    if not ID.match(key):
      return None
    with self._lock:
      return self._items.get(key)

  def __contains__(self, key: str) -> bool:
    return self.get(key) is not None


def _write_atomic(path: str, data: bytes) -> None:
  """Readers see the old file or the whole new one, never half of it (a crash leaves a .tmp)."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class SavedUsers:
  """Users made on the page, kept in `folder` so that a restarted server still knows them:
  <id>.npy (the embedding) and <id>.json (the pairs file `sample --pairs` reads, for the download
  and to embed again). At most `max_users` users and `max_bytes` bytes; the oldest (by when they
  were made) are deleted first."""

  def __init__(self, folder: str, max_users: int, max_bytes: int):
    self.folder, self.max_users, self.max_bytes = folder, max_users, max_bytes
    os.makedirs(folder, exist_ok=True)
    self._lock = threading.Lock()
    self._sizes: collections.OrderedDict[str, int] = collections.OrderedDict()
    found = []
    for name in os.listdir(folder):
      key, ext = os.path.splitext(name)
      if ext == ".tmp" or (ext == ".npy" and not os.path.exists(self._path(key, ".json"))):
        os.remove(os.path.join(folder, name))    # an interrupted write
      elif ext == ".json" and ID.match(key) and os.path.exists(self._path(key, ".npy")):
        found.append((os.path.getmtime(self._path(key, ".json")), key))
    for _, key in sorted(found):
      self._sizes[key] = self._size(key)
    with self._lock:
      self._evict()

  def _path(self, key: str, ext: str) -> str:
    return os.path.join(self.folder, key + ext)

  def _size(self, key: str) -> int:
    return sum(os.path.getsize(self._path(key, e)) for e in (".npy", ".json"))

  def _evict(self) -> None:
    while self._sizes and (len(self._sizes) > self.max_users
                           or sum(self._sizes.values()) > self.max_bytes):
      key, _ = self._sizes.popitem(last=False)
      for ext in (".json", ".npy"):
        if os.path.exists(self._path(key, ext)):
          os.remove(self._path(key, ext))

  def add(self, embedding: np.ndarray, pairs_file: str) -> str:
    key = new_id()
    buf = io.BytesIO()
    np.save(buf, np.asarray(embedding, np.float32))
    _write_atomic(self._path(key, ".npy"), buf.getvalue())
    _write_atomic(self._path(key, ".json"), pairs_file.encode("utf-8"))   # last: marks it whole
    with self._lock:
      self._sizes[key] = self._size(key)
      self._evict()
    return key

  def __contains__(self, key: str) -> bool:
    with self._lock:
      return isinstance(key, str) and bool(ID.match(key)) and key in self._sizes

  def __len__(self) -> int:
    return len(self._sizes)

  def embedding(self, key: str) -> np.ndarray | None:
    if key not in self:
      return None
    try:
      return np.load(self._path(key, ".npy"), allow_pickle=False)
    except OSError:    # evicted between the check and the read
      return None

  def pairs_file(self, key: str) -> str | None:
    if key not in self:
      return None
    try:
      with open(self._path(key, ".json"), encoding="utf-8") as f:
        return f.read()
    except OSError:
      return None


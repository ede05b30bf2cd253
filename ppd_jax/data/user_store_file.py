"""Where a user-embedding store's bytes live (data/user_store.py holds the format).

Locally a store is written to a temporary file beside its path, fsynced, then renamed, so a
reader or a killed writer never sees half a file. A URL (gs://...) cannot be memory-mapped: its
store is written locally, then uploaded whole (an object appears only once complete), and read
from a local copy made once per machine, keyed by the URL, size and modification time, so
processes share it and a rewritten store is fetched anew.
"""
import hashlib
import os
import secrets
import tempfile

from safetensors.numpy import save_file

from ppd_jax import storage


def write_atomically(path: str, tensors: dict, metadata: dict) -> None:
  """Temp file beside path (same filesystem, so os.replace is atomic), fsynced before the swap.
  A URL's store is written to a local temporary file and uploaded whole (an object appears
  only once complete)."""
  if storage.is_url(path):
    with tempfile.TemporaryDirectory(prefix="ppd_jax_store_") as tmp:
      local = os.path.join(tmp, "store.safetensors")
      save_file(tensors, local, metadata=metadata)
      with open(local, "rb") as f:
        storage.write_bytes(path, f.read())
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
  try:
    save_file(tensors, tmp, metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())     # safetensors creates 0600; make it an ordinary file
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  try:                              # make the rename itself durable; not every filesystem allows it
    fd = os.open(parent, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


def _umask() -> int:
  """The process umask, read without os.umask's set-and-restore (racy with other threads)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022


def local_copy(path: str) -> str:
  """The local file to read `path` from: itself, or for a URL a local copy (module docstring).
  A missing URL raises FileNotFoundError, as a missing local file does."""
  if not storage.is_url(path):
    return path
  remote = storage.path(path)
  st = remote.stat()
  key = hashlib.sha256(f"{path}|{st.length}|{st.mtime}".encode()).hexdigest()[:20]
  folder = os.path.join(tempfile.gettempdir(), "ppd_jax_stores")
  local = os.path.join(folder, f"{key}-{remote.name}")
  if not os.path.exists(local):
    os.makedirs(folder, exist_ok=True)
    tmp = f"{local}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "wb") as f:
      f.write(remote.read_bytes())
    os.replace(tmp, local)
  return local

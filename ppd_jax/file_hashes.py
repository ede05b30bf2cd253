"""SHA-256 of weight files, for anything that must tell one set of weights from another: reward
identities (rewards/registry.py) and evaluation manifests (evals/manifest.py). It sits at the top
of the package, importing only storage, so both can use it without importing each other."""
import hashlib
import json
import os

from ppd_jax import storage


def _hash_cache() -> str:
  return os.path.join(os.path.expanduser(os.environ.get("PPD_JAX_CACHE", "~/.cache/ppd_jax")),
                      "sha256.json")


def file_sha256(path) -> str:
  """The SHA-256 of a file's bytes. A local file's hash is remembered by (path, size, mtime), so
  multi-GB reward weights are read once, not at every evaluation."""
  p = storage.path(path)
  if storage.is_url(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()
  st = os.stat(p)
  key = f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}"
  cache_path = _hash_cache()
  try:
    with open(cache_path, encoding="utf-8") as f:
      cache = json.load(f)
  except (OSError, ValueError):
    cache = {}
  if key in cache:
    return cache[key]
  digest = hashlib.sha256()
  with open(p, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  cache[key] = digest.hexdigest()
  try:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    tmp = f"{cache_path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(cache, f)
    os.replace(tmp, cache_path)
  except OSError:
    pass                                 # a read-only home only costs a re-hash next time
  return cache[key]


def weights_sha256(location) -> dict:
  """{file name: sha256} of a weight file, or of a folder's weight files (safetensors, and the
  configs that shape them)."""
  p = storage.path(location)
  if not p.is_dir():
    return {p.name: file_sha256(p)}
  names = sorted(n.name for n in p.iterdir()
                 if n.name.endswith((".safetensors", "config.json", ".npz")))
  return {n: file_sha256(p / n) for n in names}

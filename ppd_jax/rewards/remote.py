"""Reward weights given as URLs (gs://...): --model=gs://bucket/clip_h14, --aesthetic_head=gs://...

A model folder is copied once into the user cache ($XDG_CACHE_HOME/ppd_jax/weights, else
~/.cache/ppd_jax/weights) and read from there: safetensors' safe_open and transformers' tokenizers
read local files only. A file already there with the object's size is not fetched again; each file
lands under a temporary name and is renamed, so a killed copy is redone, never half-read.
The aesthetic head, one small safetensors file, is read straight from the URL
(storage.load_safetensors).
"""
import hashlib
import os
import uuid

from ppd_jax import storage
from ppd_jax.models import aesthetic_head as head_model
from ppd_jax.weights import convert


class RemoteWeightsError(ValueError):
  """A weights URL that cannot be used; the message names the flag and the URL."""


def cache_root(environ=os.environ) -> str:
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ppd_jax", "weights")


def _files(folder):
  """Every file under `folder` (an epath), recursively."""
  for p in sorted(folder.iterdir(), key=lambda q: q.name):
    if p.is_dir():
      yield from _files(p)
    else:
      yield p


def local_folder(url: str, flag: str = "--model", marker: str = "config.json") -> str:
  """The local copy of the folder at `url` (module docstring); `marker` must be in it."""
  src = storage.path(url)
  try:
    if not (src / marker).exists():
      raise RemoteWeightsError(f"{flag}={url}: no {marker} there (expected a model folder)")
    return _copy(src, url)
  except OSError as e:    # gcsfs and the others raise OSError subclasses for network and auth
    raise RemoteWeightsError(f"{flag}={url}: cannot read it ({type(e).__name__}: {e}); check the "
                             "path, the credentials and the network") from e


def _copy(src, url: str) -> str:
  name = src.name or "model"
  dest = os.path.join(cache_root(), f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}")
  for f in _files(src):
    rel = os.path.relpath(os.fspath(f), os.fspath(src))
    target = os.path.join(dest, rel)
    size = f.stat().length
    if os.path.isfile(target) and os.path.getsize(target) == size:
      continue
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as out:
      out.write(f.read_bytes())
    os.replace(tmp, target)
  return dest


def aesthetic_head(url: str, input_dim: int) -> dict:
  """Float32 Flax params of the aesthetic head from a converted .safetensors file at `url`."""
  if not url.endswith(".safetensors"):
    raise RemoteWeightsError(f"--aesthetic_head={url}: a URL must name the converted "
                             ".safetensors file (`python -m ppd_jax.weights.aesthetic_head IN.pth "
                             "OUT.safetensors` on a local copy); a pickle is read locally only")
  if not storage.exists(url):
    raise RemoteWeightsError(f"--aesthetic_head={url}: no such file")
  try:
    state = storage.load_safetensors(url)
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
    raise convert.WeightsError(f"{url}: not a readable safetensors file ({e})") from e
  module = head_model.AestheticHead(input_dim)
  return convert.to_flax(state, head_model.init_shapes(module), what=url)

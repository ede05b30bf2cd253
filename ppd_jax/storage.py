"""The one path layer: every file a command reads or writes goes through here, so that a run folder
may be a local path or a URL (gs://, s3://, any scheme://).

Paths are etils.epath.Path, which Orbax uses too: gs:// goes through gcsfs (or tf.io.gfile when
TensorFlow is installed), a local path through the os. Only local paths are made absolute:
os.path.abspath("gs://b/run") would be "<cwd>/gs:/b/run", a folder on each worker's own disk.
"""
import os
import re
import shutil
import tempfile
import threading
import uuid

from etils import epath

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(RuntimeError):
  """A run folder that cannot be reached or written; the message names it and what to check."""


def is_url(p) -> bool:
  """True for scheme://... (gs://, s3://, ...), False for a local path."""
  return bool(_SCHEME.match(os.fspath(p)))


def path(p) -> epath.Path:
  """The epath.Path of p: a URL as it is, a local path made absolute (and ~ expanded)."""
  if isinstance(p, epath.Path) and is_url(p):
    return p
  s = os.fspath(p)
  if not is_url(s):
    return epath.Path(os.path.abspath(os.path.expanduser(s)))
  try:
    return epath.Path(s)
  except KeyError:   # etils.epath's register.make_path knows gs://, s3://, az://, hf:// only
    raise StorageError(f"{s}: unsupported URL scheme; use a local path or gs://, s3://, az://, "
                       "hf://") from None


def makedirs(p) -> epath.Path:
  """Creates the folder and its parents if missing (object stores have no folders: a no-op)."""
  p = path(p)
  p.mkdir(parents=True, exist_ok=True)
  return p


def exists(p) -> bool:
  return path(p).exists()


def read_text(p) -> str:
  return path(p).read_text()


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def write_bytes(p, data: bytes) -> None:
  """Writes a small file so that a reader never sees it half-written. Locally: a temporary name in
  the same folder, then os.replace. In an object store an upload only appears once complete, so
  the object is written directly (a rename there is a copy and a delete)."""
  p = path(p)
  if is_url(p):
    p.write_bytes(data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f".{p.name}.{uuid.uuid4().hex[:8]}.tmp"
  tmp.write_bytes(data)
  os.replace(tmp, p)


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def append_text(p, text: str) -> None:
  """Appends to a text file. Objects cannot be appended to, so a URL's file is read and written
  whole: meant for small files written now and then (metrics.jsonl at each log step)."""
  p = path(p)
  if is_url(p):
    old = p.read_text() if p.exists() else ""
    p.write_text(old + text)
    return
  with p.open("a") as f:
    f.write(text)


def load_safetensors(p) -> dict:
  """A .safetensors file as {name: numpy array}; safetensors' load_file reads local files only."""
  import safetensors.numpy
  p = path(p)
  if is_url(p):
    return safetensors.numpy.load(p.read_bytes())
  return safetensors.numpy.load_file(os.fspath(p))


# How long the start-up probe may take. A reachable bucket answers a tiny write in about a second;
# an unreachable one is retried by gcsfs with backoff for about 35 s, a black-holed network for
# as long as TCP waits. Past this the run stops, naming the path.
PROBE_TIMEOUT_S = 20.0


def check_writable(folder, timeout_s: float = PROBE_TIMEOUT_S) -> epath.Path:
  """Creates `folder` and writes and deletes a small probe file in it, so that a wrong bucket,
  missing credentials or no network fail at start-up, not at the first checkpoint."""
  folder = path(folder)
  probe = folder / f".write_probe.{uuid.uuid4().hex}"
  outcome = []

  def attempt():
    try:
      folder.mkdir(parents=True, exist_ok=True)
      probe.write_text("probe")
      probe.unlink()
      outcome.append(None)
    except Exception as e:   # each backend raises its own types (OSError, HTTP, auth errors)
      outcome.append(e)

  # A daemon thread: a probe still waiting on the network does not keep the process alive.
  worker = threading.Thread(target=attempt, name="storage-probe", daemon=True)
  worker.start()
  worker.join(timeout_s)
  if not outcome:
    raise StorageError(unreachable_message(
        folder, TimeoutError(f"no answer to a small write within {timeout_s:.0f} s")))
  if outcome[0] is not None:
    raise StorageError(unreachable_message(folder, outcome[0])) from outcome[0]
  return folder


def unreachable_message(folder, error: BaseException) -> str:
  """One line: what failed, then the folder and what to check."""
  detail = " ".join(str(error).split())[:300] or type(error).__name__
  where = os.fspath(folder)
  if is_url(where):
    scheme, rest = where.split("://", 1)
    bucket = rest.split("/", 1)[0]
    return (f"{type(error).__name__}: {detail}. Cannot write to {where}: check the "
            f"credentials (e.g. `gcloud auth application-default login`, or "
            f"GOOGLE_APPLICATION_CREDENTIALS), that the bucket {scheme}://{bucket} exists and "
            "this account may write to it, and the network.")
  return (f"{type(error).__name__}: {detail}. Cannot write to {where}: check that the path is "
          "right, that its disk is mounted and has room, and its permissions.")


class LocalMirror:
  """A local temporary folder copied to `url` on sync(), for libraries that write only to local
  files (tensorboardX's event writer). Each sync uploads the files whose size or mtime changed."""

  def __init__(self, url):
    self.url = path(url)
    self.local = tempfile.mkdtemp(prefix="ppd_jax_mirror_")
    self._seen = {}

  def sync(self) -> None:
    for root, _, files in os.walk(self.local):
      for name in files:
        full = os.path.join(root, name)
        st = os.stat(full)
        if self._seen.get(full) == (st.st_size, st.st_mtime_ns):
          continue
        rel = os.path.relpath(full, self.local)
        with open(full, "rb") as f:
          (self.url / rel).write_bytes(f.read())
        self._seen[full] = (st.st_size, st.st_mtime_ns)

  def close(self) -> None:
    self.sync()
    shutil.rmtree(self.local, ignore_errors=True)

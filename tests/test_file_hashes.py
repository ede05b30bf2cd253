"""file_hashes.py: the weight-file SHA-256 behind reward identities and evaluation manifests. The
hash of a local file is remembered by (path, size, mtime); a changed file must be hashed again, an
unchanged one must not be read again."""
import json
import os

import pytest

from ppd_jax import file_hashes

# FIPS 180-2's published test vector: SHA-256("abc").
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("PPD_JAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache" / "sha256.json"


def test_a_file_is_hashed_and_its_hash_remembered(tmp_path, cache):
  f = tmp_path / "model.safetensors"
  f.write_bytes(b"abc")
  assert file_hashes.file_sha256(f) == ABC_SHA256
  assert list(json.loads(cache.read_text()).values()) == [ABC_SHA256]
  # An unchanged file is not read again: the remembered value is what comes back.
  cache.write_text(json.dumps({k: "remembered" for k in json.loads(cache.read_text())}))
  assert file_hashes.file_sha256(f) == "remembered"


def test_a_rewritten_file_is_hashed_again(tmp_path, cache):
  f = tmp_path / "head.npz"
  f.write_bytes(b"xyz")
  first = file_hashes.file_sha256(f)
  f.write_bytes(b"abc")                  # same size: only the mtime tells the files apart
  st = os.stat(f)
  os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert file_hashes.file_sha256(f) == ABC_SHA256 != first
  assert len(json.loads(cache.read_text())) == 2


def test_a_folder_hashes_its_weight_files_only(tmp_path, cache):
  del cache
  for name in ("model.safetensors", "config.json", "head.npz", "README.md", "tokenizer.json"):
    (tmp_path / name).write_bytes(b"abc")
  found = file_hashes.weights_sha256(tmp_path)
  assert found == {n: ABC_SHA256 for n in ("config.json", "head.npz", "model.safetensors")}
  assert file_hashes.weights_sha256(tmp_path / "head.npz") == {"head.npz": ABC_SHA256}

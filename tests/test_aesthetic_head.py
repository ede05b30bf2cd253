"""The LAION aesthetic head (models/aesthetic_head.py, weights/aesthetic_head.py) against torch.

The reference is the predictor's own nn.Sequential, rebuilt here with seeded random weights and
saved with torch.save as the published .pth is (an OrderedDict state dict).
"""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ppd_jax.models import aesthetic_head
from ppd_jax.weights import aesthetic_head as head_weights
from ppd_jax.weights import convert
from ppd_jax.weights import torch_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(first: int = 1024, seed: int = 0) -> torch.nn.Sequential:
  """improved-aesthetic-predictor's MLP.layers (dropouts at 1, 3, 5; no activations)."""
  torch.manual_seed(seed)
  seq = torch.nn.Sequential(
      torch.nn.Linear(768, first), torch.nn.Dropout(0.2), torch.nn.Linear(first, 128),
      torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
      torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
  with torch.no_grad():
    for p in seq.parameters():
      p.add_(0.05 * torch.randn_like(p))   # biases off their init too
  return seq.eval()


def _state(seq: torch.nn.Sequential) -> dict:
  """The predictor's class holds the Sequential as `self.layers`: keys layers.N.*."""
  holder = torch.nn.Module()
  holder.layers = seq
  return holder.state_dict()


def _unit_vectors(n: int = 8) -> np.ndarray:
  x = np.random.default_rng(1).standard_normal((n, 768)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def pth(tmp_path):
  path = str(tmp_path / "head.pth")
  seq = _reference()
  torch.save(_state(seq), path)
  return path, seq


def test_matches_torch(pth):
  path, seq = pth
  params = head_weights.load(path)
  x = _unit_vectors()
  ours = np.asarray(aesthetic_head.AestheticHead().apply({"params": params}, x))
  with torch.no_grad():
    ref = seq(torch.from_numpy(x))[:, 0].numpy()
  assert ours.shape == (8,)
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f"aesthetic head: max relative error {rel:.2e}")
  assert rel <= 1e-5
  # No activations: the five layers are one affine map w.x + b (the module docstring's claim).
  w = [seq[i].weight.detach().double().numpy() for i, _ in aesthetic_head.LAYERS]
  b = [seq[i].bias.detach().double().numpy() for i, _ in aesthetic_head.LAYERS]
  weight, bias = np.eye(768), np.zeros(768)
  for wi, bi in zip(w, b):
    weight, bias = wi @ weight, wi @ bias + bi
  np.testing.assert_allclose(x @ weight[0] + bias[0], ref, rtol=1e-5, atol=1e-6)


def test_cli_round_trip(pth, tmp_path):
  path, _ = pth
  out = str(tmp_path / "head.safetensors")
  done = subprocess.run([sys.executable, "-m", "ppd_jax.weights.aesthetic_head", path, out],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "note:" in done.stdout   # not the published file's sha256
  with safe_open(out, "numpy") as f:
    assert f.metadata()["source_sha256"] == torch_pickle.sha256(path)
    assert sorted(f.keys()) == sorted(f"layers.{i}.{p}" for i, _ in aesthetic_head.LAYERS
                                      for p in ("weight", "bias"))
  a, b = head_weights.load(path), head_weights.load(out)
  for layer in a:
    for leaf in a[layer]:
      np.testing.assert_array_equal(a[layer][leaf], b[layer][leaf])
  with pytest.raises(FileExistsError, match="--overwrite"):
    head_weights.convert_file(path, out)
  head_weights.convert_file(path, out, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["head.pth", "head.safetensors"]   # no partial left


def test_wrong_shape_is_refused(tmp_path):
  path = str(tmp_path / "wide.pth")
  torch.save(_state(_reference(first=512)), path)
  with pytest.raises(convert.WeightsError, match=r"wide\.pth.*layers\.0\.weight"):
    head_weights.load(path)
  with pytest.raises(convert.WeightsError, match=r"nothing\.safetensors: no such file"):
    head_weights.load(str(tmp_path / "nothing.safetensors"))


def test_cuda_tagged_storages_load_on_cpu(pth, tmp_path):
  """The published .pth's storages are tagged cuda:0: map_location="cpu" must be in use."""
  path, seq = pth
  tagged = str(tmp_path / "cuda.pth")
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(tagged, "w", zipfile.ZIP_STORED) as dst:
    for info in src.infolist():
      data = src.read(info)
      if info.filename.endswith("/data.pkl"):   # protocol-2 BINUNICODE 'cpu' -> 'cuda:0'
        assert b"X\x03\x00\x00\x00cpu" in data
        data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
      dst.writestr(info, data)
  if not torch.cuda.is_available():
    with pytest.raises(RuntimeError, match="CUDA"):
      torch.load(tagged, weights_only=True)
  params = head_weights.load(tagged)
  np.testing.assert_array_equal(params["layers_7"]["bias"], seq[7].bias.detach().numpy())

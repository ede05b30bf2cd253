"""The one place in ppd_jax that opens a pickle-format file (a torch `.pt` / `.pth` state dict).

A pickle can run arbitrary code when it is loaded, and some reward-model weights are published
only as pickles (HPSv2's `HPS_v2*_compressed.pt`, the LAION aesthetic head's `.pth`). They are read
here once, by the converters (weights/convert_open_clip.py, weights/aesthetic_head.py), which
write safetensors; evaluation reads only safetensors, never a pickle, and needs no torch.

    torch.load(path, map_location="cpu", weights_only=True)

weights_only=True is torch's restricted unpickler: it rebuilds tensors, dicts and a few plain
types, and refuses any other global (e.g. `builtins.exec`, `posix.system`, a model class) before
calling it. There is no fallback to weights_only=False, ever: a file it refuses is an error that
names the file and torch's reason (which names the global). map_location="cpu" is required because
the aesthetic head's storages are tagged cuda:0. A zip-format file (what torch.save writes since
1.6) is memory-mapped, so a 2 GB checkpoint is not read into memory twice.
"""
import hashlib
import os
import zipfile
from typing import Any, Mapping

import numpy as np

from ppd_jax.weights.convert import WeightsError


def sha256(path: str, chunk: int = 1 << 20) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      digest.update(block)
  return digest.hexdigest()


def _torch():
  try:
    import torch
  except ImportError as e:
    raise WeightsError("reading a torch pickle needs torch: pip install torch==2.13.0 (the CPU "
                       "build) or 'ppd_jax[test]'") from e
  return torch


def _unwrap(obj: Any, path: str) -> Mapping:
  """{'state_dict': sd, 'epoch': ...} (HPS, training checkpoints) -> sd; a bare mapping as is."""
  if not isinstance(obj, Mapping):
    raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of "
                       "parameter names to tensors)")
  inner = obj.get("state_dict")
  if isinstance(inner, Mapping):
    return inner
  return obj


def _strip_module(keys: list[str]) -> int:
  """torch DistributedDataParallel saves every key under `module.`; strip it when all have it."""
  prefix = "module."
  return len(prefix) if keys and all(k.startswith(prefix) for k in keys) else 0


def _reason(error: Exception) -> str:
  """torch's refusal, without its advice to retry unsafely: the line naming the global."""
  text = str(error)
  for line in text.splitlines():
    if "WeightsUnpickler error:" in line:
      return line.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0].strip()
  first = text.strip().splitlines()[0] if text.strip() else ""
  return f"{type(error).__name__}: {first}"


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch state-dict pickle -> {name: numpy array}.

  fp16 and fp32 tensors keep their dtype (as do integer buffers); bf16, which numpy lacks, becomes
  float32. Raises WeightsError naming the file when it is missing, is not a torch file, holds a
  global the restricted unpickler refuses, or is not a mapping of str to tensors.
  """
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such file")
  torch = _torch()
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
  except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
    raise WeightsError(f"{path}: not loadable as a weights-only torch file "
                       f"({_reason(e)}); it is never loaded with weights_only=False") from e
  state = _unwrap(obj, path)
  skip = _strip_module([str(k) for k in state])
  out = {}
  for key, value in state.items():
    if not isinstance(key, str):
      raise WeightsError(f"{path}: state-dict key {key!r} is not a string")
    if not isinstance(value, torch.Tensor):
      raise WeightsError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
    value = value.detach()
    if value.dtype == torch.bfloat16:
      value = value.float()
    out[key[skip:]] = value.numpy()
  return out

"""Frozen base weights saved by the project's own scripts: one .npz of flattened params + metadata.

The file holds every base (non-user-branch) parameter under its '/'-joined path, and `__meta__`, a
JSON string with the architecture it was trained for (the `config.model` fields that shape the
params) and whatever else the producer records (text encoder, training recipe). Loading checks the
architecture against the run's config, so a stale or foreign file fails with the field that differs
instead of a shape error deep inside jit.
"""
import json
import os
import zipfile

import numpy as np
from flax import traverse_util

from ppd_jax.weights import WeightFileError

# config.model fields that decide parameter shapes (dtype, remat and base itself do not).
ARCHITECTURE_FIELDS = (
    "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "attention_head_dim", "cross_attention_dim",
    "norm_num_groups", "transformer_layers_per_block", "use_linear_projection",
)
_META_KEY = "__meta__"
_DEMO_BASE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "demo", "base_16px.npz")


# What np.load raises for a file cut short or not an .npz at all.
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


class BaseWeightsError(WeightFileError):
  """A base-weights file that is missing, unreadable or made for another architecture."""


def architecture(model_cfg) -> dict:
  """The shape-deciding fields of config.model or a UNetConfig, as JSON values (lists)."""
  out = {}
  for k in ARCHITECTURE_FIELDS:
    v = getattr(model_cfg, k)
    out[k] = list(v) if isinstance(v, (list, tuple)) else v
  return out


def resolve(base: str) -> str:
  """config.model.base -> file path: "demo" is the packaged demo base, else a path to a .npz."""
  return _DEMO_BASE if base == "demo" else os.path.abspath(os.path.expanduser(base))


def save(path: str, base_params, model_cfg, **meta) -> None:
  """Writes base params + metadata atomically (a kill mid-write leaves the old file intact)."""
  flat = traverse_util.flatten_dict(base_params, sep="/")
  arrays = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  arrays[_META_KEY] = np.array(json.dumps({"architecture": architecture(model_cfg), **meta}))
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def read_meta(path: str) -> dict:
  try:
    with np.load(path) as f:
      return json.loads(str(f[_META_KEY]))
  except _UNREADABLE as e:
    raise BaseWeightsError(f"{path}: not a readable base-weights .npz ({type(e).__name__}: "
                           f"{e}); write it again with ppd_jax.models.base_weights") from e


def load(base: str, model_cfg, expected_shapes=None) -> tuple[dict, dict]:
  """config.model.base -> (nested base params of float32 numpy arrays, metadata).

  expected_shapes: optional nested dict of ShapeDtypeStructs (the model's base tree); every leaf
  must be present with that shape and nothing else may be in the file.
  """
  path = resolve(base)
  if not os.path.exists(path):
    raise BaseWeightsError(f"config.model.base={base!r}: no file at {path}")
  try:
    with np.load(path) as f:
      meta = json.loads(str(f[_META_KEY]))
      flat = {k: f[k] for k in f.files if k != _META_KEY}
  except _UNREADABLE as e:
    raise BaseWeightsError(f"config.model.base={base!r}: cannot read {path}: {e}") from e
  want = architecture(model_cfg)
  for k, v in want.items():
    if meta["architecture"].get(k) != v:
      raise BaseWeightsError(
          f"config.model.{k}={v!r} but the base weights in {path} were trained with "
          f"{meta['architecture'].get(k)!r}")
  if expected_shapes is not None:
    expected = {k: tuple(v.shape)
                for k, v in traverse_util.flatten_dict(expected_shapes, sep="/").items()}
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    wrong = sorted(k for k in set(expected) & set(flat) if expected[k] != flat[k].shape)
    if missing or extra or wrong:
      raise BaseWeightsError(f"{path}: params do not match the model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}, wrong shape {wrong[:3]}")
  return traverse_util.unflatten_dict(flat, sep="/"), meta

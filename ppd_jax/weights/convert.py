"""PyTorch state dicts (as numpy, from safetensors) -> Flax param trees, driven by the Flax tree.

Naming rule shared by every Flax module of ppd_jax.models: a Flax param path is the PyTorch key
split at ".", with each all-digit part joined to the one before it by "_", and the leaf renamed:

    down_blocks.0.attentions.1.proj_in.weight  ->  down_blocks_0/attentions_1/proj_in/kernel
    text_model.encoder.layers.3.mlp.fc1.bias   ->  text_model/encoder/layers_3/mlp/fc1/bias

    Linear.weight      [out, in]              ->  kernel [in, out]
    Conv2d.weight      [out, in, kh, kw]      ->  kernel [kh, kw, in, out]   (HWIO)
    ConvTranspose2d.weight [in, out, kh, kw]  ->  kernel [kh, kw, in, out]   (no flip; only for
                                                  the module paths `transposed` names: the Flax
                                                  module applies PyTorch's transposed conv to it)
    *Norm.weight       [C]                    ->  scale
    Embedding.weight   [N, C]                 ->  embedding (unchanged)

The conversion walks the Flax tree the model expects (from jax.eval_shape), finds each leaf's
PyTorch key, and checks its shape; a key the tree does not use, or a leaf with no key, is an error
that names it. Nothing here imports torch.
"""
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

_LEAF_SOURCES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class WeightsError(ValueError):
  """Weights that do not fit the model: missing, unexpected or mis-shaped keys."""


def flax_path(torch_key: str) -> tuple[str, ...]:
  """'a.b.0.c.weight' -> ('a', 'b_0', 'c', 'weight') (the leaf keeps its PyTorch name)."""
  out: list[str] = []
  for part in torch_key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


_LITERAL_NAMES = {"linear_1", "linear_2"}   # module names that end in _N without being an index


def torch_key(path: tuple[str, ...]) -> str:
  """Inverse of flax_path for error messages: ('a', 'b_0', 'weight') -> 'a.b.0.weight'."""
  parts = [p if p in _LITERAL_NAMES else
           re.sub(r"(?:_\d+)+$", lambda m: m.group(0).replace("_", "."), p) for p in path]
  return ".".join(parts)


def _to_flax_leaf(leaf: str, value: np.ndarray, transposed: bool = False) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 0, 1) if transposed else value.transpose(2, 3, 1, 0)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def to_flax(state_dict: Mapping[str, np.ndarray], target: Any, *, what: str = "weights",
            rename: Callable[[str], str | None] = lambda k: k,
            dtype=np.float32, transposed: str | None = None) -> dict:
  """PyTorch-named arrays -> nested Flax params with exactly the target tree's paths and shapes.

  target: nested dict whose leaves have `.shape` (ShapeDtypeStructs or arrays).
  rename: maps a source key to its canonical PyTorch key (older layouts), or None to drop it
    (buffers such as position_ids).
  what: names the source in errors (a file or folder).
  dtype: the leaves' dtype (a copy); None keeps each source dtype and copies nothing (the leaves
    are views, transposed where the layout says so): the converters' check before writing.
  transposed: a regex; a 4-D kernel whose Flax module path ("a/b_0/c") it fully matches comes
    from a ConvTranspose2d ([in, out, kh, kw]).
  """
  is_transposed = re.compile(transposed).fullmatch if transposed else lambda _: None
  by_path: dict[tuple[str, ...], tuple[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    canonical = rename(key)
    if canonical is not None:
      by_path[flax_path(canonical)] = (key, value)

  out, used, missing, wrong = {}, set(), [], []
  for path, leaf_shape in traverse_util.flatten_dict(target).items():
    leaf = path[-1]
    source = path[:-1] + (_LEAF_SOURCES.get(leaf, leaf),)
    if source not in by_path:
      missing.append(torch_key(source))
      continue
    key, value = by_path[source]
    used.add(source)
    value = _to_flax_leaf(leaf, np.asarray(value), bool(is_transposed("/".join(path[:-1]))))
    if tuple(value.shape) != tuple(leaf_shape.shape):
      wrong.append(f"{key} {tuple(value.shape)} != {tuple(leaf_shape.shape)}")
      continue
    out[path] = value if dtype is None else value.astype(dtype)
  unexpected = sorted(by_path[p][0] for p in set(by_path) - used)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing key(s): {', '.join(sorted(missing)[:5])}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}")
  if wrong:
    problems.append(f"{len(wrong)} key(s) of the wrong shape: {', '.join(wrong[:5])}")
  if problems:
    raise WeightsError(f"{what}: " + "; ".join(problems))
  return traverse_util.unflatten_dict(out)

"""The one interface every reward has, and the batched, device-sharded runner they share.

    reward.score(images, prompts) -> np.ndarray [N] float32, higher = preferred

`images` is anything rewards/preprocess.py reads: the sampler's [N, H, W, 3] arrays (floats in
[-1, 1]), uint8 arrays, PIL images or file paths. `prompts` has one caption per image (image-only
rewards such as the aesthetic score accept and ignore it). Win rates and relabelling compare two
scores of one reward, so they do not depend on its scale; reported means do, and each reward's
docstring states its formula and scale.
"""
import math
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class Reward(Protocol):
  name: str

  def score(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
    """[N] float32 scores of N images, each under its prompt."""


def check_prompts(images_count: int, prompts: Sequence[str]) -> list[str]:
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if len(prompts) != images_count:
    raise ValueError(f"score: {images_count} image(s) but {len(prompts)} prompt(s); give one "
                     "prompt per image")
  return prompts


class ShardedBatches:
  """Runs `fn(params, *arrays)` over fixed-size batches split over this process's devices.

  The params are put on the devices once (replicated) and shared by every function run. The batch
  is rounded up to a multiple of the local device count and a short last batch is padded by
  repeating its last row, so each function compiles once; the rows of each batch are sharded
  along the mesh's "data" axis. Each process scores its own images (a multi-host job splits the
  images, not the batches).
  """

  def __init__(self, params: Any, batch_size: int):
    devices = jax.local_devices()
    self.mesh = Mesh(np.array(devices), ("data",))
    self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
    self.rows = NamedSharding(self.mesh, PartitionSpec("data"))
    self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
    self._jitted: dict[Callable, Callable] = {}

  def __call__(self, fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    """fn(params, *batch) -> [batch, ...]; the rows of all batches, concatenated."""
    if fn not in self._jitted:
      self._jitted[fn] = jax.jit(fn, out_shardings=self.rows)
    jitted = self._jitted[fn]
    n = len(arrays[0])
    out = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start:start + self.batch_size] for a in arrays]
      size = len(chunk[0])
      if size < self.batch_size:
        chunk = [np.concatenate([c, np.repeat(c[-1:], self.batch_size - size, axis=0)])
                 for c in chunk]
      result = jitted(self.params, *(jax.device_put(c, self.rows) for c in chunk))
      out.append(np.asarray(result)[:size])
    if not out:
      return np.zeros((0,), np.float32)
    return np.concatenate(out)

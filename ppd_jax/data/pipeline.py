"""Grain loader: shuffled global batches of preference pairs, each process reading its own rows.

Order of records: a seeded permutation per epoch (reshuffled every epoch), cut into global batches
of `global_batch` pairs. Process p of P reads rows [p * B/P, (p + 1) * B/P) of every global batch,
so the global batch is the same whatever the number of processes (a run on 2 hosts trains exactly
like one on 1 host), yet no process reads another's rows. The iterator's state (a position in this
sequence) is saved with each checkpoint, and a resumed run continues with the exact next batch.
"""
import dataclasses
from typing import Protocol

import grain
import numpy as np


class PairSource(Protocol):
  """Random access to preference pairs; `gather` returns a dict of stacked arrays."""

  def __len__(self) -> int: ...
  def gather(self, indices: np.ndarray) -> dict: ...


@dataclasses.dataclass(frozen=True)
class _ReadRows:
  """Picklable map step (Grain workers are separate processes): global index batch -> my rows."""
  source: PairSource
  start: int
  stop: int

  def __call__(self, indices: np.ndarray) -> dict:
    return self.source.gather(np.asarray(indices[self.start:self.stop]))


def make_dataset(source: PairSource, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, worker_count: int = 0) -> grain.IterDataset:
  """An endless, checkpointable iterable of this process's part of each global batch."""
  if global_batch % process_count:
    raise ValueError(f"config.batch_size={global_batch} must be divisible by the "
                     f"{process_count} processes")
  if len(source) < global_batch:
    raise ValueError(f"the data source has {len(source)} pairs, fewer than one batch "
                     f"(config.batch_size={global_batch})")
  local = global_batch // process_count
  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
  ds = ds.batch(global_batch, drop_remainder=True)
  ds = ds.map(_ReadRows(source, process_index * local, (process_index + 1) * local))
  # Each element is a whole batch: read a few ahead, not Grain's default of hundreds.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if worker_count:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it

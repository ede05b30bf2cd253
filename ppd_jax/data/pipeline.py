"""Grain loader: shuffled global batches of preference pairs, each process reading its own rows.

Order of records: a seeded permutation per epoch (reshuffled every epoch), cut into global batches
of `global_batch` pairs. Process p of P reads rows [p * B/P, (p + 1) * B/P) of every global batch,
so the global batch is the same whatever the number of processes (a run on 2 hosts trains exactly
like one on 1 host), yet no process reads another's rows.

The sequence is a pure function of (source, batch size, seed), so a position in it is one number:
how many global batches the trainer has taken. `Batches` saves that number with each checkpoint
(not Grain's iterator state, whose shape depends on the number of worker processes) and a resumed
run starts its Grain pipeline at that batch, whatever `data.worker_count` is now.
"""
import dataclasses
import functools
import signal
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
                 process_count: int = 1, worker_count: int = 0,
                 start: int = 0) -> grain.IterDataset:
  """An endless iterable of this process's part of each global batch, from global batch `start`
  on (skipped by index, so the batches before it are never read)."""
  if global_batch % process_count:
    raise ValueError(f"config.batch_size={global_batch} must be divisible by the "
                     f"{process_count} processes")
  if len(source) < global_batch:
    raise ValueError(f"the data source has {len(source)} pairs, fewer than one batch "
                     f"(config.batch_size={global_batch})")
  local = global_batch // process_count
  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
  ds = ds.batch(global_batch, drop_remainder=True)[start:]
  ds = ds.map(_ReadRows(source, process_index * local, (process_index + 1) * local))
  # Each element is a whole batch: read a few ahead, not Grain's default of hundreds.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if worker_count:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                        worker_init_fn=_ignore_ctrl_c)
  return it


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
  """A terminal's Ctrl-C reaches the worker processes too: let the main process alone decide
  (it saves and stops them, preemption.py), rather than each dying with a traceback."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


class Batches:
  """Iterator over this process's rows of the global batches; `get_state()` is the position
  {"next_batch": n}, the number of batches taken by the caller (not those workers read ahead), the
  same for every process and every worker count. The Grain pipeline starts at the first `next`."""

  def __init__(self, source: PairSource, global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1, worker_count: int = 0):
    self._make = functools.partial(make_dataset, source, global_batch, seed, process_index,
                                   process_count, worker_count)
    self._make()   # checks the sizes now, before any expensive work
    self.next_batch = 0
    self._it = None

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = iter(self._make(start=self.next_batch))
    batch = next(self._it)
    self.next_batch += 1
    return batch

  def get_state(self) -> dict:
    return {"next_batch": self.next_batch}

  def set_state(self, state: dict) -> None:
    next_batch = state["next_batch"]
    if not isinstance(next_batch, int) or next_batch < 0:
      raise ValueError(f"next_batch={next_batch!r}: must be a batch count >= 0")
    self.close()
    self.next_batch = next_batch

  def close(self) -> None:
    """Stops the Grain pipeline (its worker processes, if any)."""
    if self._it is not None:
      self._it.close()
      self._it = None


def position_from_grain_state(state: dict) -> int:
  """The number of global batches taken, from the Grain iterator state older checkpoints hold.

  Without workers it is {"next_index": n}. With W workers (mp_prefetch), worker i reads batches
  i, i + W, ... and the state lists each worker's next_index: the batches taken are their sum.
  """
  if "next_index" in state:
    return int(state["next_index"])
  if "iterators_in_use_states" in state:
    return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])
  raise ValueError(f"not a Grain iterator state this version reads (keys {sorted(state)})")

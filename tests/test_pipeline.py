"""The Grain loader: per-process rows, epochs, exact resume from the iterator state."""
import numpy as np
import pytest

from ppd_jax.data import pipeline


class _Numbers:
  """A source whose record i is the number i, so batches show which records were read."""

  def __init__(self, n):
    self.n, self.reads = n, []

  def __len__(self):
    return self.n

  def gather(self, indices):
    self.reads.append(np.asarray(indices).copy())
    return {"x": np.asarray(indices, np.int64)}


def _take(it, k):
  return [next(it)["x"] for _ in range(k)]


def test_processes_read_disjoint_rows_that_make_the_single_process_batch():
  single = _take(iter(pipeline.make_dataset(_Numbers(40), 8, seed=3)), 10)
  sources = [_Numbers(40) for _ in range(2)]
  parts = [_take(iter(pipeline.make_dataset(s, 8, 3, p, 2)), 10) for p, s in enumerate(sources)]
  for step in range(10):
    a, b = parts[0][step], parts[1][step]
    assert len(a) == len(b) == 4
    np.testing.assert_array_equal(np.concatenate([a, b]), single[step])
  # Each process read only its own rows: every read (prefetching may run ahead, in any order) is
  # this process's half of one of the global batches.
  ahead = _take(iter(pipeline.make_dataset(_Numbers(40), 8, seed=3)), 40)
  for p, s in enumerate(sources):
    mine = {tuple(batch[4 * p:4 * (p + 1)]) for batch in ahead}
    assert s.reads and all(tuple(r) in mine for r in s.reads)


def test_every_epoch_is_a_new_permutation_of_all_records():
  batches = _take(iter(pipeline.make_dataset(_Numbers(16), 4, seed=0)), 8)
  first, second = np.concatenate(batches[:4]), np.concatenate(batches[4:])
  assert sorted(first) == sorted(second) == list(range(16))
  assert not np.array_equal(first, second)


def test_resume_from_state_gives_the_exact_next_batches():
  it = iter(pipeline.make_dataset(_Numbers(30), 4, seed=1))
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 6)
  resumed = iter(pipeline.make_dataset(_Numbers(30), 4, seed=1))
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 6), expected):
    np.testing.assert_array_equal(a, b)


def test_seed_changes_the_order():
  a = np.concatenate(_take(iter(pipeline.make_dataset(_Numbers(30), 5, seed=1)), 3))
  b = np.concatenate(_take(iter(pipeline.make_dataset(_Numbers(30), 5, seed=2)), 3))
  assert not np.array_equal(a, b)


def test_bad_sizes_are_clear_errors():
  with pytest.raises(ValueError, match="divisible by the 3 processes"):
    pipeline.make_dataset(_Numbers(30), 8, 0, 0, 3)
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.make_dataset(_Numbers(3), 8, 0)

"""The data position in a checkpoint: independent of data.worker_count (Grain's own iterator state
is not), readable from older checkpoints, and an unreadable one never advises deleting anything."""
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_runs
from absl import flags
from test_pipeline import _Numbers
from test_pipeline import _take

from ppd_jax import checkpoint as ckpt_lib
from ppd_jax.data import pipeline

# Grain's worker processes read absl flags (PITFALLS.md): outside app.run they must be parsed.
flags.FLAGS.mark_as_parsed()

_N, _BATCH, _SEED, _TAKEN = 30, 4, 1, 5


def _config(workers):
  return tiny_runs.tiny_config(**{"data.worker_count": workers})


def _batches(workers):
  return pipeline.Batches(_Numbers(_N), _BATCH, _SEED, worker_count=workers)


def _state():
  return {"w": jnp.arange(3.0)}


def _restore(ckpt, workers):
  """(restored state, iterator at the saved position) for a run with `workers` Grain workers."""
  it = _batches(workers)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = ckpt.restore(ckpt_lib.abstract_like(_state(), {"w": sharding}), it,
                       config=_config(workers))
  return state, it


def _never_stopped(k):
  """Batches _TAKEN .. _TAKEN + k of a run that was never stopped."""
  it = _batches(0)
  return _take(it, _TAKEN + k)[_TAKEN:]


@pytest.mark.parametrize("saved_with, resumed_with", [(0, 2), (2, 0)])
def test_a_run_resumes_with_another_worker_count_at_the_exact_next_batch(saved_with,
                                                                          resumed_with, tmp_path):
  it = _batches(saved_with)
  _take(it, _TAKEN)
  assert it.get_state() == {"next_batch": _TAKEN}   # taken, not read ahead by workers
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(_TAKEN, _state(), it, _config(saved_with))
  it.close()
  state, resumed = _restore(ckpt, resumed_with)
  got = _take(resumed, 6)
  resumed.close()
  ckpt.close()
  np.testing.assert_array_equal(state["w"], np.arange(3.0))
  for a, b in zip(got, _never_stopped(6)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("workers", [0, 2])
def test_grain_states_of_older_checkpoints_give_the_batches_taken(workers):
  it = iter(pipeline.make_dataset(_Numbers(_N), _BATCH, _SEED, worker_count=workers))
  taken = 0
  for more in (1, 3, 3):
    _take(it, more)
    taken += more
    assert pipeline.position_from_grain_state(it.get_state()) == taken
  it.close()


def _old_format_checkpoint(directory, workers, read_with=None):
  """A checkpoint as older versions wrote it, its config saying data.worker_count=workers: the
  data item is Grain's iterator state (from `read_with` workers if given, else `workers`)."""
  read_with = workers if read_with is None else read_with
  it = iter(pipeline.make_dataset(_Numbers(_N), _BATCH, _SEED, worker_count=read_with))
  _take(it, _TAKEN)
  manager = ocp.CheckpointManager(directory, item_names=("state", "data", "config"))
  manager.save(_TAKEN, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state()), data=grain.checkpoint.CheckpointSave(it),
      config=ocp.args.JsonSave(json.loads(_config(workers).to_json()))))
  manager.wait_until_finished()
  manager.close()
  it.close()
  assert "process_0-of-1.json" in os.listdir(os.path.join(directory, str(_TAKEN), "data"))


def test_an_older_checkpoint_saved_with_workers_resumes_without_them(tmp_path):
  _old_format_checkpoint(str(tmp_path), workers=2)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  _, resumed = _restore(ckpt, 0)
  for a, b in zip(_take(resumed, 4), _never_stopped(4)):
    np.testing.assert_array_equal(a, b)
  ckpt.close()


def test_an_unreadable_data_position_names_the_setting_and_never_advises_deleting(tmp_path):
  _old_format_checkpoint(str(tmp_path), workers=2, read_with=0)   # the file is replaced below
  with open(os.path.join(tmp_path, str(_TAKEN), "data", "process_0-of-1.json"), "w") as f:
    json.dump({"a_future_grain_field": 3}, f)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointError) as error:
    _restore(ckpt, 0)
  ckpt.close()
  message = str(error.value)
  assert "data.worker_count=2 (this run: 0)" in message
  assert "--config.data.worker_count=2" in message
  assert "keep the checkpoint" in message
  assert "delete" not in message.lower()
  assert os.path.isdir(os.path.join(tmp_path, str(_TAKEN), "state"))


def test_a_damaged_state_says_how_to_fall_back_without_deleting(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(_TAKEN, _state(), _batches(0), _config(0))
  for root, _, files in os.walk(os.path.join(tmp_path, str(_TAKEN), "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with pytest.raises(ckpt_lib.CheckpointError) as error:
    _restore(ckpt, 0)
  ckpt.close()
  message = str(error.value)
  assert f"move {tmp_path / str(_TAKEN)} out of {tmp_path} (keep it)" in message
  assert "delete" not in message.lower()

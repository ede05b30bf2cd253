"""What keeps a long run safe: non-finite steps never reach a checkpoint, resume refuses what it
cannot honour, a torn metrics line or a restart does not corrupt the curves, SIGTERM saves."""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_runs

from ppd_jax import checkpoint as ckpt_lib
from ppd_jax import trainer
from ppd_jax import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(total_steps, **overrides):
  return tiny_runs.tiny_config(total_steps=total_steps, log_every=1, checkpoint_every=2,
                               **overrides)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _restore(workdir, step, config):
  """The saved TrainState at `step`, restored into this process (host numpy)."""
  from ppd_jax import sharding as shd
  from ppd_jax import state as state_lib
  from ppd_jax import step as step_lib
  from ppd_jax.models import build_model
  mesh = shd.make_mesh(-1, 1)
  model = build_model(config.model)
  tx, _ = step_lib.make_optimizer(config)
  state, _, st_sh, _ = state_lib.create_train_state(model, tx, mesh, config.seed)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  restored = ckpt.restore(ckpt_lib.abstract_like(state, st_sh), step=step)
  ckpt.close()
  return jax.device_get(restored)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
  """4 clean steps, checkpoints at 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("clean"))
  state = trainer.train_and_evaluate(_tiny(4), workdir)
  return workdir, jax.device_get(state)


class _Poisoned:
  """The synthetic source with NaN user embeddings in the records `bad` (all when None)."""

  def __init__(self, inner, bad=None):
    self.inner, self.bad = inner, bad

  def __len__(self):
    return len(self.inner)

  def gather(self, indices):
    out = dict(self.inner.gather(indices))
    hit = np.ones(len(indices), bool) if self.bad is None else np.isin(indices, self.bad)
    out["user_embedding"] = np.array(out["user_embedding"])
    out["user_embedding"][hit] = np.nan
    return out

  def held_out(self):
    return self.inner.held_out()


def _poison(monkeypatch, bad):
  real = sources.build_source
  monkeypatch.setattr(sources, "build_source", lambda config: _Poisoned(real(config), bad))


def test_a_few_bad_pairs_are_skipped_counted_and_training_goes_on(tmp_path, monkeypatch,
                                                                 capsys):
  """2 of the 64 records carry a NaN embedding: the steps whose batch holds one skip their
  update (counted, reported with the batch's ids), the others train; params stay finite."""
  bad = np.array([5, 40])
  _poison(monkeypatch, bad)
  state = jax.device_get(trainer.train_and_evaluate(_tiny(8), str(tmp_path)))
  rows = _rows(str(tmp_path))
  skipped = int(rows[-1]["skipped_updates"])
  assert 1 <= skipped < 8, rows
  assert int(state.skipped_updates) == skipped
  assert all(np.isfinite(x).all() for x in jax.tree.leaves((state.user_params, state.opt_state)))
  assert sum(not np.isfinite(r["loss"]) for r in rows) == skipped
  warnings = [l for l in capsys.readouterr().out.splitlines() if "update skipped" in l]
  assert len(warnings) == skipped
  for line in warnings:   # each names its batch's pairs, a bad one among them
    pairs = {int(p) for p in line.split("pairs [")[1].split("]")[0].split(", ")}
    assert pairs & {5, 40}, line


def test_too_many_nonfinite_steps_stop_naming_them_and_leave_finite_checkpoints(
    clean_run, tmp_path, monkeypatch):
  """From step 5 on every batch is NaN. With the old trainer params turned NaN and, with
  keep_checkpoints=3, no finite checkpoint was left. Now the run stops after
  max_nonfinite_steps=3 skips, naming the steps and ids, and every checkpoint on disk (the one
  saved at step 6 included) holds step 4's finite params."""
  workdir = str(tmp_path / "run")
  shutil.copytree(clean_run[0], workdir)
  _poison(monkeypatch, None)
  config = _tiny(20, **{"optim.max_nonfinite_steps": 3})
  with pytest.raises(trainer.NonFiniteError) as err:
    trainer.train_and_evaluate(config, workdir)
  message = str(err.value)
  assert "steps 5..7" in message and "optim.max_nonfinite_steps=3" in message
  assert "pairs [" in message and "user_ids [" in message
  steps = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
  assert 6 in steps and max(steps) == 6
  for step in steps:
    saved = _restore(workdir, step, config)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved.user_params))
  jax.tree.map(np.testing.assert_array_equal, _restore(workdir, 6, config).user_params,
               clean_run[1].user_params)


def test_resume_refuses_changed_settings_naming_them(clean_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(clean_run[0], workdir)
  for field, value in (("batch_size", 16), ("seed", 1), ("loss", "sft"), ("dpo.beta", 10.0),
                       ("optim.lr", 1e-4)):
    with pytest.raises(ckpt_lib.CheckpointError, match=rf"{field}: checkpoint .* != config") as e:
      trainer.train_and_evaluate(_tiny(6, **{field: value}), workdir)
    assert f"--allow_changed={field}" in str(e.value)
  assert max(ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()) == 4


def test_an_allowed_change_resumes(clean_run, tmp_path, capsys):
  workdir = str(tmp_path / "copy")
  shutil.copytree(clean_run[0], workdir)
  state = trainer.train_and_evaluate(_tiny(5, **{"optim.lr": 1e-4}), workdir,
                                     allow_changed=("optim",))
  assert int(jax.device_get(state.step)) == 5
  assert "optim.lr: checkpoint 0.0003 != config 0.0001" in capsys.readouterr().out


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(clean_run, tmp_path, capsys):
  workdir = str(tmp_path / "torn")
  shutil.copytree(clean_run[0], workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "loss": 0.69')             # killed mid-write
  trainer.train_and_evaluate(_tiny(5), workdir)
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4, 5]
  assert "is not a metrics row" in capsys.readouterr().out


def _events(folder):
  """(step, tag) of every scalar, and purge steps, in file order; read from the TFRecord framing
  (u64 length, u32 crc, data, u32 crc) with tensorboardX's Event proto."""
  from tensorboardX.proto import event_pb2
  out = []
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        out.append(("purge", event.step))
      for value in event.summary.value:
        out.append((value.tag, event.step))
  return out


def _as_tensorboard_shows(events):
  """TensorBoard's rule: a SessionLog.START at step s drops every earlier event with step >= s."""
  kept = []
  for tag, step in events:
    if tag == "purge":
      kept = [(t, s) for t, s in kept if s < step]
    else:
      kept.append((tag, step))
  return kept


def test_tensorboard_curves_do_not_overlap_after_a_resume(clean_run, tmp_path):
  """A run killed after logging step 4 but before checkpointing it resumes from step 2 and
  logs 3 and 4 again: TensorBoard must show each step once."""
  workdir = str(tmp_path / "killed")
  shutil.copytree(clean_run[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  trainer.train_and_evaluate(_tiny(5), workdir)
  raw = [(t, s) for t, s in _events(os.path.join(workdir, "tensorboard")) if t == "loss"]
  assert sorted(s for _, s in raw) == [1, 2, 3, 3, 4, 4, 5], "the test needs an overlap to fix"
  shown = [s for t, s in _as_tensorboard_shows(_events(os.path.join(workdir, "tensorboard")))
           if t == "loss"]
  assert shown == [1, 2, 3, 4, 5]


def test_sigterm_saves_the_current_step_and_the_rerun_resumes_exactly(tmp_path):
  workdir = str(tmp_path / "preempted")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
      [sys.executable, "-m", "ppd_jax.train", "--config=configs/ppd.py:tiny", f"--workdir={workdir}",
       "--config.total_steps=1000", "--config.checkpoint_every=1000", "--config.log_every=1"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopping at step" in out and "SIGTERM" in out, out[-2000:]
  stopped = int(out.split("stopping at step ")[1].split()[0])
  assert 3 <= stopped < 1000
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == stopped

  resumed = jax.device_get(trainer.train_and_evaluate(_tiny(stopped + 1), workdir))
  straight = jax.device_get(trainer.train_and_evaluate(_tiny(stopped + 1), str(tmp_path / "s")))
  jax.tree.map(np.testing.assert_array_equal, resumed.user_params, straight.user_params)

"""End-to-end training through trainer.train_and_evaluate: resume, learning, bad input."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import ppd
from ppd_jax import checkpoint as ckpt_lib
from ppd_jax import config_validation
from ppd_jax import trainer


def _tiny(total_steps):
  c = ppd.get_config("tiny")
  c.total_steps = total_steps
  c.log_every = 1
  c.checkpoint_every = 3
  c.async_checkpointing = True
  # All 8 fake devices: the resumed run restores onto a sharded mesh.
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


_TIMING = ("pairs_per_second", "eta_seconds", "tflops_per_device", "mfu")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  state = trainer.train_and_evaluate(_tiny(6), workdir)
  return workdir, jax.device_get(state)


def test_resume_equals_uninterrupted(straight_run, tmp_path):
  """Train 2K steps straight == train K, stop, run the same command again for 2K."""
  straight_dir, straight = straight_run
  workdir = str(tmp_path / "resumed")
  trainer.train_and_evaluate(_tiny(3), workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  resumed = jax.device_get(trainer.train_and_evaluate(_tiny(6), workdir))

  assert int(resumed.step) == int(straight.step) == 6
  jax.tree.map(np.testing.assert_array_equal, resumed.user_params, straight.user_params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, straight.opt_state)
  a, b = _rows(straight_dir), _rows(workdir)
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
  for ra, rb in zip(a, b):
    assert {k: v for k, v in ra.items() if k not in _TIMING} == {
        k: v for k, v in rb.items() if k not in _TIMING}


def test_a_finished_run_says_so_and_builds_nothing(straight_run, monkeypatch, capsys):
  """Rerunning a run whose latest checkpoint is at total_steps (or past it) prints one line and
  returns before any model, state or compile; the folder is left as it was."""
  workdir, _ = straight_run
  def refuse(*a, **k):
    raise AssertionError("built or compiled")
  monkeypatch.setattr(trainer.state_lib, "create_train_state", refuse)
  monkeypatch.setattr(trainer.step_lib, "make_train_step", refuse)
  before = sorted(os.listdir(workdir)), _rows(workdir)
  for total in (6, 4):
    assert trainer.train_and_evaluate(_tiny(total), workdir) is None
    out = capsys.readouterr().out
    assert f"finished at step 6 (total_steps {total}); nothing to do; raise " \
           "--config.total_steps above 6 to continue" in out, out
  assert (sorted(os.listdir(workdir)), _rows(workdir)) == before


def test_run_folder_layout(straight_run):
  workdir, _ = straight_run
  rows = _rows(workdir)
  for key in ("step", "loss", "implicit_accuracy", "reward_margin", "pairs_per_second"):
    assert key in rows[0]
  assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
  assert any(f.startswith("events.out.tfevents") for f in
             os.listdir(os.path.join(workdir, "tensorboard")))
  # keep_checkpoints=3 of the default config keeps both of this run's checkpoints.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["total_steps"] == 6


def test_mismatched_checkpoint_is_a_clear_error(straight_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight_run[0], workdir)
  c = _tiny(8)
  c.model.block_out_channels = (16, 16)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"model\.block_out_channels"):
    trainer.train_and_evaluate(c, workdir)


def test_corrupt_checkpoint_is_a_clear_error(straight_run, tmp_path):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(straight_run[0], workdir)
  state_dir = os.path.join(workdir, "checkpoints", "6", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/6"):
    trainer.train_and_evaluate(_tiny(8), workdir)
  # The earlier checkpoint is untouched.
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3", "state"))


@pytest.mark.parametrize("field, value, message", [
    ("total_steps", 0, r"config\.total_steps=0"),
    ("dpo.beta", -1.0, r"config\.dpo\.beta=-1\.0"),
    ("loss", "ppo", r"config\.loss='ppo'"),
    ("model.dtype", "float16", r"config\.model\.dtype"),
    ("model.norm_num_groups", 5, r"config\.model\.norm_num_groups=5"),
    ("batch_size", 6, r"config\.batch_size=6: must be divisible by grad_accum_steps"),
])
def test_bad_config_values_are_rejected_naming_the_field(field, value, message, tmp_path):
  c = _tiny(2)
  if field == "batch_size":
    c.grad_accum_steps = 4
  node, *rest = field.split(".")
  if rest:
    c[node][rest[0]] = value
  else:
    c[node] = value
  with pytest.raises(config_validation.ConfigError, match=message):
    trainer.train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints"), "nothing may start before validation"


def test_train_cli_rejects_a_bad_override_naming_the_field(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "ppd_jax.train", "--config=configs/ppd.py:tiny",
       f"--workdir={tmp_path}", "--config.optim.lr=5.0"],
      cwd=root, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "config.optim.lr=5.0: must be in (0, 1)" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_architecture_errors_are_config_errors(tmp_path):
  c = _tiny(2)
  c.model.attention_head_dim = 5   # heads that do not divide the channels
  with pytest.raises(config_validation.ConfigError, match=r"config\.model"):
    trainer.train_and_evaluate(c, str(tmp_path))


def test_a_save_killed_midway_is_ignored_and_the_last_good_checkpoint_resumes(straight_run,
                                                                              tmp_path):
  """Orbax writes STEP.orbax-checkpoint-tmp and renames it when complete: a run killed during a
  save leaves such a folder, which a restart must neither trust nor trip over."""
  workdir = str(tmp_path / "killed")
  shutil.copytree(straight_run[0], workdir)
  partial = os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp", "state")
  os.makedirs(partial)
  with open(os.path.join(partial, "half_written"), "wb") as f:
    f.write(b"\x00" * 10)
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 6
  state = trainer.train_and_evaluate(_tiny(7), workdir)
  assert int(jax.device_get(state.step)) == 7
  assert [r["step"] for r in _rows(workdir)] == list(range(1, 8))

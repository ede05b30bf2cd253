"""Ctrl-C on `python -m ppd_jax.train`: the first saves the current step and exits 0 with one line;
a second quits at once, even while the main thread sits in a compile."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import tiny_runs

from ppd_jax import checkpoint as ckpt_lib
from ppd_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Train:
  """`python -m ppd_jax.train` on the tiny config, its stdout and stderr read line by line."""

  def __init__(self, workdir, *flags):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "ppd_jax.train", "--config=configs/ppd.py:tiny",
         f"--workdir={workdir}", "--config.total_steps=1000", "--config.checkpoint_every=1000",
         "--config.log_every=1", *flags],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    self.lines = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout))
    self._reader.start()

  def wait_for(self, predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and self.proc.poll() is None:
      if predicate(self.lines):
        return
      time.sleep(0.1)
    raise AssertionError("".join(self.lines)[-3000:])

  def finish(self, timeout):
    self.proc.wait(timeout=timeout)
    self._reader.join()
    return "".join(self.lines)


def _steps_logged(lines):
  return [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step ")]


def _metrics_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def test_ctrl_c_saves_the_current_step_in_one_line_and_the_rerun_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  run = _Train(workdir)
  run.wait_for(lambda lines: len(_steps_logged(lines)) >= 2)
  logged = max(_steps_logged(run.lines))
  run.proc.send_signal(signal.SIGINT)
  out = run.finish(timeout=120)
  assert run.proc.returncode == 0, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith("stopping at step ") and "(SIGINT)" in last, out[-2000:]
  assert "run the same command to resume" in last
  stopped = int(last.split()[3])
  assert stopped >= logged
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == stopped

  config = tiny_runs.tiny_config(total_steps=stopped + 1, log_every=1, checkpoint_every=1000)
  state = trainer.train_and_evaluate(config, workdir)
  assert int(jax.device_get(state.step)) == stopped + 1
  assert _metrics_steps(workdir)[-2:] == [stopped, stopped + 1]   # continued, not restarted


def test_a_second_ctrl_c_quits_at_once_without_a_traceback(tmp_path):
  # With the cache off the first compile takes many seconds: the main thread is in XLA's C++
  # code, where Python runs no signal handler, when both Ctrl-Cs arrive.
  workdir = str(tmp_path / "run")
  run = _Train(workdir, "--compilation_cache=off")
  run.wait_for(lambda lines: any(line.startswith("starting step 0") for line in lines))
  time.sleep(2)   # into the loop, where Ctrl-C means "save and stop"
  run.proc.send_signal(signal.SIGINT)
  run.wait_for(lambda lines: any(line.startswith("Ctrl-C: stopping") for line in lines), 30)
  t0 = time.time()
  run.proc.send_signal(signal.SIGINT)
  out = run.finish(timeout=30)
  assert time.time() - t0 < 5, out[-2000:]
  assert run.proc.returncode == 130, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert out.strip().splitlines()[-1].startswith("second Ctrl-C: quitting now"), out[-2000:]
  assert not _steps_logged(run.lines), "the second Ctrl-C came during the first compile"

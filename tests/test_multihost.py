"""Two local CPU processes (gloo collectives on loopback) train the same as one process.

Each run has 4 devices in all: one process with 4, or two processes with 2 each. The data
pipeline gives the same global batches whatever the process count, each process reading only its
own rows, so the metrics and the saved user branch must agree.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from ppd_jax import checkpoint
from ppd_jax import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "ppd_jax.train", "--config=configs/ppd.py:tiny",
          f"--workdir={workdir}", f"--config.total_steps={STEPS}", "--config.checkpoint_every=3",
          *extra]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".jax_cache")
  return env


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(tmp_path):
  single = str(tmp_path / "single")
  subprocess.run(_train_cmd(single), env=_env(4), cwd=ROOT, check=True, timeout=300,
                 capture_output=True)

  multi = str(tmp_path / "multi")
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      _train_cmd(multi, f"--coordinator_address={address}", "--num_processes=2",
                 f"--process_id={i}"),
      env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-3000:]}"
  assert "processes 2" in logs[0]

  for a, b in zip(_rows(single), _rows(multi)):
    assert a["step"] == b["step"]
    for k in ("loss", "implicit_accuracy", "reward_margin", "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=2e-3, err_msg=k)
  # One data position for both processes: global batches taken, whatever the process count.
  ckpt = checkpoint.Checkpointer(os.path.join(multi, "checkpoints"))
  position = ckpt._manager.restore(  # pylint: disable=protected-access
      STEPS, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
  ckpt.close()
  assert position == {"next_batch": STEPS}

  p1 = jax.device_get(inference.load_trained(single).params)
  p2 = jax.device_get(inference.load_trained(multi).params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=3e-5), p1, p2)

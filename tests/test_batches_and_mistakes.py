"""Batches that divide over the devices (refused before any work otherwise), the per-device
micro-batch the accumulation follows from, and one clear last line, without a traceback, for a
person's usual mistakes on the command lines: a misspelt --config field, an unreadable weights file,
a --model folder that is not LLaVA-OneVision, a resume that changes the trained params' shapes."""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from configs import ppd
from ppd_jax import batch_plan
from ppd_jax import checkpoint as ckpt_lib
from ppd_jax import config_validation
from ppd_jax.weights import WeightFileError
from ppd_jax.weights import hf_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str, devices: int = 8, timeout: int = 300) -> tuple[subprocess.CompletedProcess,
                                                                     float]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  t0 = time.perf_counter()
  done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  return done, time.perf_counter() - t0


def _one_clear_line(done: subprocess.CompletedProcess, prog: str) -> str:
  """The failure is exit non-zero, no traceback, and a last line from the program itself."""
  assert done.returncode != 0, done.stdout[-2000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert "Event loop is closed" not in done.stderr, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{prog}: "), done.stderr[-3000:]
  return last


# -- batches that divide -------------------------------------------------------------------------

def test_batch_that_does_not_divide_over_the_devices_is_refused_naming_them():
  c = ppd.get_config("tiny")
  c.batch_size = 12
  with pytest.raises(config_validation.ConfigError) as e:
    batch_plan.resolve(c, 8)
  message = str(e.value)
  assert "config.batch_size=12" in message and "8 devices" in message
  assert "8 or 16" in message                   # the multiples of 8 either side of 12


def test_accumulation_that_would_duplicate_rows_is_refused():
  """16 pairs on 8 devices are 2 per device: 4 micro-steps cannot split them evenly, and a
  micro-batch of 4 rows over 8 devices would repeat rows."""
  c = ppd.get_config("tiny")
  c.batch_size, c.grad_accum_steps = 16, 4
  with pytest.raises(config_validation.ConfigError) as e:
    batch_plan.resolve(c, 8)
  message = str(e.value)
  assert "2 pairs per device" in message and "config.grad_accum_steps=4" in message
  assert "grad_accum_steps one of 1, 2" in message and "per_device_batch" in message
  c.grad_accum_steps = 2
  batch_plan.resolve(c, 8)                       # 2 per device in 2 micro-steps of 1: fine


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_accumulation_follows_the_per_device_batch_on_any_device_count(devices):
  c = ppd.get_config("pickapic_sd15")
  most = c.per_device_batch
  assert most > 0
  batch_plan.resolve(c, devices)
  # batch = devices x micro x accumulation, the micro-batch within what fits a device
  micro = c.batch_size // (devices * c.grad_accum_steps)
  assert devices * micro * c.grad_accum_steps == c.batch_size
  assert micro <= most
  if c.batch_size // devices % most == 0:
    assert micro == most                          # the fewest micro-steps: the whole budget


def test_fewest_micro_steps_keep_the_micro_batch_within_the_budget():
  for per_device in range(1, 97):
    for most in (1, 2, 3, 5, 16):
      steps = batch_plan.fewest_micro_steps(per_device, most)
      assert per_device % steps == 0 and per_device // steps <= most
      assert all(per_device % a or per_device // a > most for a in range(1, steps))


def test_a_hand_set_accumulation_that_contradicts_the_per_device_batch_is_refused():
  c = ppd.get_config("pickapic_sd15")
  c.grad_accum_steps = 3                         # 8 devices x 16 pairs need 6
  with pytest.raises(config_validation.ConfigError, match=r"grad_accum_steps=3.*6.*per_device"):
    batch_plan.resolve(c, 8)


@pytest.mark.parametrize("variant", ["pickapic_sd15", "pickapic_sdxl", "pickapic_cascade_lite",
                                     "sd15", "sd21", "sdxl", "cascade_lite", "cascade"])
def test_published_variants_split_on_one_to_eight_gpus(variant):
  for devices in (1, 2, 4, 8):
    c = ppd.get_config(variant)
    batch_plan.resolve(c, devices)
    assert c.batch_size // (devices * c.grad_accum_steps) <= c.per_device_batch


def test_a_resume_may_change_the_accumulation():
  """It splits the same global batch (a step is the gradient of its mean either way)."""
  saved = ckpt_lib._jsonable(ppd.get_config("tiny"))
  c = ppd.get_config("tiny")
  c.grad_accum_steps, c.per_device_batch = 2, 4
  current = ckpt_lib._jsonable(c)
  problems = []
  for section in ckpt_lib._MUST_MATCH:
    problems += ckpt_lib._mismatches({section: saved.get(section)}, {section: current.get(section)})
  assert problems == []
  c.batch_size = 32                              # the data position still pins the global batch
  problems = [p for s in ckpt_lib._MUST_MATCH for p in ckpt_lib._mismatches(
      {s: saved.get(s)}, {s: ckpt_lib._jsonable(c).get(s)})]
  assert problems and problems[0].startswith("batch_size")


def test_train_cli_refuses_an_indivisible_batch_at_once(tmp_path):
  done, seconds = _cli("-m", "ppd_jax.train", "--config=configs/ppd.py:tiny",
                       f"--workdir={tmp_path / 'run'}", "--config.batch_size=12")
  last = _one_clear_line(done, "ppd_jax.train")
  assert "config.batch_size=12" in last and "8 devices" in last
  assert "sampling" not in done.stdout and not os.path.exists(tmp_path / "run" / "checkpoints")
  assert seconds < 60, seconds                   # before model init, data or compile


# -- one clear line ------------------------------------------------------------------------------

def test_misspelt_config_field_names_it_and_the_field_meant(tmp_path):
  done, _ = _cli("-m", "ppd_jax.train", "--config=configs/ppd.py:tiny",
                 f"--workdir={tmp_path}", "--config.optim.lrr=1")
  last = _one_clear_line(done, "ppd_jax.train")
  assert "--config.optim.lrr" in last and "did you mean optim.lr?" in last


def test_a_misspelt_field_of_a_default_config_file_is_one_line(tmp_path):
  # The demo's --config has a default file, whose overrides config_flags applies while the flag is
  # defined (at import), before absl's parser runs.
  done, _ = _cli("-m", "ppd_jax.demo", f"--workdir={tmp_path}", "--config.seeed=1")
  last = _one_clear_line(done, "ppd_jax.demo")
  assert "--config.seeed" in last and "did you mean seed?" in last


def _safetensors(path: str) -> str:
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_file({"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}, path)
  return path


def test_truncated_or_missing_safetensors_is_one_error_naming_the_file(tmp_path):
  folder = str(tmp_path / "pipe")
  path = _safetensors(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
  assert set(hf_folder.read_weights(folder, "unet")) == {"w"}
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(WeightFileError, match=rf"{path} is not a readable safetensors file"):
    hf_folder.read_weights(folder, "unet")
  os.remove(path)
  with pytest.raises(WeightFileError, match=r"unet: no weights diffusion_pytorch_model"):
    hf_folder.read_weights(folder, "unet")


def test_train_cli_names_a_truncated_weights_file(tmp_path):
  from ppd_jax.models import base_weights
  path = base_weights.resolve("demo")
  with open(path, "rb") as f:
    data = f.read()
  cut = str(tmp_path / "base.npz")
  with open(cut, "wb") as f:
    f.write(data[:len(data) // 2])
  done, _ = _cli("-m", "ppd_jax.train", "--config=configs/ppd.py:demo", f"--workdir={tmp_path}",
                 f"--config.model.base={cut}", devices=1)
  last = _one_clear_line(done, "ppd_jax.train")
  assert cut in last and "not a readable" in last


@pytest.mark.parametrize("kind", ["empty", "clip"])
def test_embed_cli_refuses_a_folder_that_is_not_llava_onevision(kind, tmp_path):
  folder = tmp_path / kind
  folder.mkdir()
  if kind == "clip":
    transformers = pytest.importorskip("transformers")
    transformers.CLIPConfig().save_pretrained(str(folder))    # a CLIP model's own config.json
  done, _ = _cli("-m", "ppd_jax.users.embed", f"--model={folder}",
                 f"--pairs={tmp_path / 'pairs.jsonl'}", f"--out={tmp_path / 'users.safetensors'}",
                 devices=1)
  last = _one_clear_line(done, "ppd_jax.users.embed")
  assert f"--model={folder}" in last
  assert ("'clip' model, not LLaVA-OneVision" if kind == "clip" else "no config.json") in last


def test_resume_with_other_param_shapes_is_one_line_without_asyncio_noise(tmp_path):
  """--allow_changed=model.user_embed_dim accepts the config change, but the saved params have
  the old shape: the restore is refused before Orbax starts reading (a read that fails midway
  leaves its async reads behind, which print "Event loop is closed" tracebacks at exit)."""
  script = textwrap.dedent(f"""
      import sys
      import jax, jax.numpy as jnp
      from configs import ppd
      from ppd_jax import checkpoint as ckpt_lib

      class Position:
        def get_state(self):
          return {{"next_batch": 0}}

      def state(dim):
        return {{"user_params": {{"proj": {{"kernel": jnp.ones((dim, 32)),
                                            "bias": jnp.zeros((32,))}}}},
                "step": jnp.zeros((), jnp.int32)}}

      c = ppd.get_config("tiny")
      ckpt = ckpt_lib.Checkpointer({str(tmp_path / 'checkpoints')!r}, async_save=False)
      ckpt.save(2, state(16), Position(), c)
      ckpt.wait()
      c.model.user_embed_dim = 8
      try:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                                  state(8)), config=c)
      except ckpt_lib.CheckpointError as e:
        sys.exit(f"ppd_jax.train: {{e}}")
      """)
  done, _ = _cli("-c", script, devices=1, timeout=120)
  last = _one_clear_line(done, "ppd_jax.train")
  assert "model.user_embed_dim changed" in last
  assert "user_params/proj/kernel: saved (16, 32), this run (8, 32)" in last
  assert "even with --allow_changed" in last

"""No shipped config aborts the process on a CPU: bf16 UNets meet an XLA CPU (YNNPACK) CHECK
failure that ppd_jax's import avoids by itself (ppd_jax/xla_cpu.py)."""
import os
import subprocess
import sys

import pytest
import tiny_sd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update({"JAX_PLATFORMS": "cpu", **extra})
  return env


def test_the_flag_is_set_on_cpu_and_left_alone_otherwise():
  code = "import os, ppd_jax; print(os.environ.get('XLA_FLAGS', ''))"
  run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                   text=True, timeout=120, cwd=ROOT).stdout
  assert "xla_cpu_experimental_ynn_fusion_type" in run(_env())
  assert "xla_cpu_experimental_ynn_fusion_type" not in run(_env(JAX_PLATFORMS="cuda"))
  own = run(_env(XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=individual_dot"))
  assert own.strip() == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


@pytest.fixture(scope="module")
def three_block_folder(tmp_path_factory):
  """The reviewer's case: 16x16 latents, three down blocks, head counts [2, 4, 4]."""
  folder = str(tmp_path_factory.mktemp("sd3") / "tiny-sd15-3blocks")
  kwargs = dict(block_out_channels=(16, 32, 32),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=[2, 4, 4], cross_attention_dim=32)
  return tiny_sd.save_pipeline(folder, "sd15", unet_kwargs=kwargs, sample_size=16)


def test_sd15_config_trains_in_bf16_on_cpu_without_aborting(three_block_folder, tmp_path):
  """Without the guard this process dies inside XLA (ynn_emitter.cc ... reshape vs. bitcast)."""
  done = subprocess.run(
      [sys.executable, "-m", "ppd_jax.train", "--config=configs/ppd.py:sd15",
       f"--config.model.pretrained={three_block_folder}", "--config.data.source=synthetic",
       f"--workdir={tmp_path / 'run'}", "--config.total_steps=1", "--config.batch_size=8",
       "--config.log_every=1", "--config.model.user_embed_dim=24", "--config.data.num_users=8",
       "--config.data.num_unseen_users=2", "--config.data.pool_per_caption=2",
       "--config.sample.num_steps=2", "--config.eval_every=0"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "step 1/1" in done.stdout

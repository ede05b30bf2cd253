"""What a real precompute launch needs: its image encoder is traced under its device mesh, so the
VAE's attention chooses its kernel for one device's rows (and runs a Pallas kernel per device under
shard_map on a TPU); a misspelt --config field is one line, as for train."""
import os
import subprocess
import sys
import types

import jax
import numpy as np

from ppd_jax.data import precompute
from ppd_jax.models import attention_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_image_encoder_is_traced_under_its_device_mesh():
  seen = []

  def images_to_latents(params, images):
    # What VAE attention reads at trace time (attention_kernels.attention_in_mesh).
    seen.append(attention_kernels._batch_shards())
    return images * params

  backbone = types.SimpleNamespace(latent_encoder=(images_to_latents, np.float32(2.0)))
  encode, per = precompute.make_image_encoder(backbone, batch=5)
  devices = len(jax.local_devices())
  assert devices > 1, "the test set-up provides several fake CPU devices (conftest.py)"
  assert per == -(-5 // devices) * devices
  out = np.asarray(encode(np.ones((3, 2, 2, 3), np.float32)))
  assert seen == [(devices, ("batch",))]
  assert out.shape == (per, 2, 2, 3) and (out[:3] == 2.0).all()


def test_a_misspelt_config_field_is_named_in_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  result = subprocess.run(
      [sys.executable, "-m", "ppd_jax.data.precompute",
       f"--config={ROOT}/configs/ppd.py:pickapic_sd15",
       "--config.data.text_chunkk=8", f"--input={tmp_path}", f"--output={tmp_path / 'out'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith("ppd_jax.data.precompute: --config.data.text_chunkk: the config "
                             "has no field data.text_chunkk")

"""A diffusers-format folder, end to end through the command lines: train (sd15 config, synthetic
preference pairs on the folder's own samples), sample, export; then diffusers loads the export with
load_ip_adapter and its UNet, given the user embedding as ip_adapter image embeds, gives our output.
SDXL (pooled text + time_ids in every batch) trains in-process."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_sd
from PIL import Image

from configs import ppd
from ppd_jax import config_validation
from ppd_jax import inference
from ppd_jax import models
from ppd_jax import trainer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The sd15 config's run length and sizes, cut to test scale (the architecture is the folder's).
SMALL = ["--config.total_steps=3", "--config.batch_size=8", "--config.checkpoint_every=3",
         "--config.log_every=1", "--config.model.user_embed_dim=24", "--config.sample.num_steps=4",
         "--config.data.num_users=8", "--config.data.num_unseen_users=2",
         "--config.data.pool_per_caption=2", "--config.optim.lr=1e-2"]


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd_e2e")
  folder = tiny_sd.save_pipeline(str(root / "tiny-sd15"), "sd15")
  workdir = str(root / "run")
  _cli("ppd_jax.train", "--config=configs/ppd.py:sd15", f"--config.model.pretrained={folder}",
       "--config.data.source=synthetic", f"--workdir={workdir}", *SMALL)
  return folder, workdir


def test_train_cli_records_the_folder_architecture(trained):
  folder, workdir = trained
  run = inference.load_trained(workdir)
  assert run.step == 3
  assert run.config.model.pretrained == folder
  assert tuple(run.config.model.block_out_channels) == (32, 64)   # the folder's, not SD 1.5's
  assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_sample_cli_decodes_through_the_vae(trained, tmp_path):
  _, workdir = trained
  out = tmp_path / "images"
  _cli("ppd_jax.sample", f"--workdir={workdir}", f"--out={out}", "--prompt=a red circle",
       "--user=1", "--num_steps=3", "--sampler=euler")
  files = sorted(os.listdir(out))
  assert files == ["a-red-circle_1x1_scale1_cfg7.5_euler3_ckpt3_s0_0.png", "prompts.jsonl"]
  assert Image.open(out / files[0]).size == (16, 16)   # 8x8 latents, VAE factor 2


def test_export_loads_in_diffusers_and_matches_our_unet(trained, tmp_path):
  folder, workdir = trained
  out = tmp_path / "adapter"
  _cli("ppd_jax.export", f"--workdir={workdir}", f"--out={out}")
  weight_name = [f for f in os.listdir(out) if f.endswith(".safetensors")][0]

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                           requires_safety_checker=False)
  pipe.load_ip_adapter(str(out), subfolder="", weight_name=weight_name, image_encoder_folder=None)
  run = inference.load_trained(workdir)
  assert run.config.model.dtype == "bfloat16"      # trained with the sd15 config's bf16 base
  cfg32 = run.config.model.to_dict()
  cfg32["dtype"] = "float32"                       # compared in float32, like diffusers here
  model = models.build_model(cfg32)
  user = run.source.user_embedding(1)                                  # [tokens, dim]
  rng = np.random.RandomState(0)
  x = rng.randn(1, 8, 8, 4).astype(np.float32)
  text = run.source.encode_captions(["a red circle"])["text_embedding"]
  ours = model.apply({"params": run.params}, x, np.array([500]), text, user[None], 1.0)
  with torch.no_grad():
    theirs = pipe.unet(tiny_sd.torch_nchw(x), torch.tensor([500]), torch.from_numpy(text),
                       added_cond_kwargs={"image_embeds": [torch.from_numpy(user[None])]}
                       ).sample.numpy().transpose(0, 2, 3, 1)
  base = model.apply({"params": run.params}, x, np.array([500]), text, None)
  scale = float(np.abs(theirs).max())
  assert float(np.abs(np.asarray(ours) - theirs).max()) <= 1e-4 * max(1.0, scale)
  assert float(np.abs(np.asarray(ours) - np.asarray(base)).max()) > 1e-3   # the user matters
  # [negative; positive] embeds, the negative half masked off as our sampler's user-off uncond.
  embeds = torch.from_numpy(user)[None, None].expand(2, -1, -1, -1)
  mask = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
  images = pipe("a red circle", ip_adapter_image_embeds=[embeds], num_inference_steps=2,
                cross_attention_kwargs={"ip_adapter_masks": [mask]}, guidance_scale=2.0,
                output_type="np").images
  assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_sdxl_folder_trains(tmp_path):
  folder = tiny_sd.save_pipeline(str(tmp_path / "tiny-sdxl"), "sdxl")
  c = ppd.get_config("sdxl")
  c.model.pretrained = folder
  for flag in SMALL:
    key, value = flag[len("--config."):].split("=")
    section, field = key.split(".") if "." in key else (None, key)
    target = c[section] if section else c
    target[field] = type(target[field])(value)
  c.total_steps = 2
  config_validation.prepare(c)
  state = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  assert int(state.step) == 2
  user = jax.tree.leaves(state.user_params)
  assert all(np.isfinite(np.asarray(x)).all() for x in user)

"""Loading a diffusers-format folder: tiny SD 1.x / 2.x / SDXL pipelines saved by diffusers in the
test, loaded by ppd_jax.weights (safetensors' numpy API), checked against the same folder loaded by
diffusers/transformers in PyTorch: UNet outputs, the text conditioning the pipelines build, VAE
latents; then the file-format cases (fp16 variant, shards, both CLIP key layouts, bad keys).
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_sd
from safetensors.numpy import load_file, save_file

from configs import ppd
from ppd_jax import backbones
from ppd_jax import config_validation
from ppd_jax import models
from ppd_jax import state as state_lib
from ppd_jax.weights import convert
from ppd_jax.weights import hf_folder
from ppd_jax.weights import pretrained

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

KINDS = ("sd15", "sd21", "sdxl")
CAPTIONS = ["a red circle", "a big dark blue square photo", ""]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipelines")
  return {k: tiny_sd.save_pipeline(str(root / k), k) for k in KINDS}


def _config(folder: str):
  c = ppd.get_config("sd15")
  c.model.pretrained = folder
  c.model.dtype = "float32"
  config_validation.prepare(c)
  return c


def _max_rel_err(got, want) -> float:
  want = np.asarray(want, np.float32)
  return float(np.abs(np.asarray(got, np.float32) - want).max() / max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("kind", KINDS)
def test_unet_matches_diffusers(folders, kind):
  c = _config(folders[kind])
  model = models.build_model(c.model)
  base = state_lib.initial_base_params(model, 0, "random", c.model.pretrained)
  ref = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(folders[kind], "unet")).eval()
  rng = np.random.RandomState(0)
  x = rng.randn(2, 8, 8, 4).astype(np.float32)
  t = np.array([10, 700])
  text = rng.randn(2, tiny_sd.TEXT_LENGTH, c.model.cross_attention_dim).astype(np.float32)
  added, torch_added = None, None
  if kind == "sdxl":
    added = {"text_embeds": rng.randn(2, 16).astype(np.float32),
             "time_ids": np.array([[16, 16, 0, 0, 16, 16], [32, 24, 2, 1, 16, 16]], np.float32)}
    torch_added = {k: torch.from_numpy(v) for k, v in added.items()}
  with torch.no_grad():
    want = ref(tiny_sd.torch_nchw(x), torch.from_numpy(t), torch.from_numpy(text),
               added_cond_kwargs=torch_added).sample.numpy().transpose(0, 2, 3, 1)
  got = model.apply({"params": base}, x, t, text, None, 0.0, added)
  assert _max_rel_err(got, want) <= 1e-4
  assert c.diffusion.prediction_type == ("v_prediction" if kind == "sd21" else "epsilon")


@pytest.mark.parametrize("kind", KINDS)
def test_text_conditioning_matches_the_diffusers_pipeline(folders, kind):
  """Tokenizer from the folder + Flax CLIP == the pipeline's encode_prompt (SDXL: both encoders'
  penultimate states, pooled projection, zeros for the empty prompt)."""
  c = _config(folders[kind])
  ours = backbones.build_backbone(c).encode_captions(CAPTIONS)
  if kind == "sdxl":
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folders[kind])
    with torch.no_grad():
      embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS[:2], device="cpu",
                                                do_classifier_free_guidance=False)
    assert _max_rel_err(ours["pooled_text_embedding"][:2], pooled.numpy()) <= 1e-4
    assert (ours["pooled_text_embedding"][2] == 0).all() and (ours["text_embedding"][2] == 0).all()
    np.testing.assert_array_equal(ours["time_ids"][0], [16, 16, 0, 0, 16, 16])
    want = embeds.numpy()
  else:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders[kind], safety_checker=None,
                                                             requires_safety_checker=False)
    with torch.no_grad():
      want = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)[0].numpy()
  assert ours["text_embedding"][:len(want)].shape == want.shape
  assert _max_rel_err(ours["text_embedding"][:len(want)], want) <= 1e-4


def test_vae_latents_and_decode_match_diffusers(folders):
  c = _config(folders["sd15"])
  bb = backbones.build_backbone(c)
  ref = diffusers.AutoencoderKL.from_pretrained(os.path.join(folders["sd15"], "vae")).eval()
  images = np.random.RandomState(1).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    mean = ref.encode(tiny_sd.torch_nchw(images)).latent_dist.mean
    want_latents = (mean * ref.config.scaling_factor).numpy().transpose(0, 2, 3, 1)
    decoded = ref.decode(mean).sample.clamp(-1, 1).numpy().transpose(0, 2, 3, 1)
  latents = bb.to_latents(images)
  assert _max_rel_err(latents, want_latents) <= 1e-4
  assert _max_rel_err(bb.to_images(latents), decoded) <= 1e-4


def _unet_base(folder: str, variant: str = ""):
  c = _config(folder)
  c.model.variant = variant
  model = models.build_model(c.model)
  return state_lib.initial_base_params(model, 0, "random", folder, variant)


def _copy(folder: str, tmp_path, name: str) -> str:
  out = str(tmp_path / name)
  shutil.copytree(folder, out)
  pretrained.open_pipeline.cache_clear()
  return out


def test_fp16_variant_and_shards_load_the_same_weights(folders, tmp_path):
  reference = _unet_base(folders["sd15"])
  fp16 = _copy(folders["sd15"], tmp_path, "fp16")
  unet_dir = os.path.join(fp16, "unet")
  full = load_file(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
  save_file({k: v.astype(np.float16) for k, v in full.items()},
            os.path.join(unet_dir, "diffusion_pytorch_model.fp16.safetensors"))
  got = _unet_base(fp16, "fp16")
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(got)):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=2e-3 * max(1.0, np.abs(a).max()))

  sharded = _copy(folders["sd15"], tmp_path, "sharded")
  unet_dir = os.path.join(sharded, "unet")
  os.remove(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
  keys = sorted(full)
  weight_map = {}
  for i, part in enumerate((keys[::2], keys[1::2])):
    name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
    save_file({k: full[k] for k in part}, os.path.join(unet_dir, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(_unet_base(sharded))):
    np.testing.assert_array_equal(a, b)


def test_both_clip_key_layouts_load(folders, tmp_path):
  c = _config(folders["sd15"])
  want = backbones.build_backbone(c).encode_captions(CAPTIONS)["text_embedding"]
  legacy = _copy(folders["sd15"], tmp_path, "legacy_clip")
  path = os.path.join(legacy, "text_encoder", "model.safetensors")
  weights = load_file(path)
  assert not any(k.startswith("text_model.") for k in weights)   # transformers 5 layout
  old = {"text_model." + k: v for k, v in weights.items()}
  old["text_model.embeddings.position_ids"] = np.arange(tiny_sd.TEXT_LENGTH)[None]
  save_file(old, path)
  c = _config(legacy)
  got = backbones.build_backbone(c).encode_captions(CAPTIONS)["text_embedding"]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("change,message", [
    (lambda w: w.pop("conv_in.weight"), "missing key.*conv_in.weight"),
    (lambda w: w.update({"extra.weight": np.zeros(3, np.float32)}), "unexpected key.*extra.weight"),
    (lambda w: w.update({"conv_in.bias": np.zeros(5, np.float32)}), "wrong shape.*conv_in.bias"),
])
def test_bad_unet_keys_are_named(folders, tmp_path, change, message):
  broken = _copy(folders["sd15"], tmp_path, "broken")
  path = os.path.join(broken, "unet", "diffusion_pytorch_model.safetensors")
  weights = load_file(path)
  change(weights)
  save_file(weights, path)
  with pytest.raises(convert.WeightsError, match=message):
    _unet_base(broken)


def test_folder_errors_name_the_file_or_field(folders, tmp_path):
  c = ppd.get_config("sd15")
  c.model.pretrained = str(tmp_path / "nowhere")
  with pytest.raises(config_validation.ConfigError, match="model.pretrained"):
    config_validation.prepare(c)
  c = ppd.get_config("sd15")
  c.model.pretrained, c.model.base = folders["sd15"], "demo"
  with pytest.raises(config_validation.ConfigError, match="model.base"):
    config_validation.prepare(c)
  corrupt = _copy(folders["sd15"], tmp_path, "corrupt")
  with open(os.path.join(corrupt, "vae", "diffusion_pytorch_model.safetensors"), "wb") as f:
    f.write(b"not safetensors")
  with pytest.raises(hf_folder.FolderError, match="vae/diffusion_pytorch_model.safetensors"):
    pretrained.load_vae(pretrained.open_pipeline(corrupt))
  with open(os.path.join(corrupt, "unet", "config.json"), "w") as f:
    json.dump({"_class_name": "UNet2DConditionModel", "class_embed_type": "timestep"}, f)
  pretrained.open_pipeline.cache_clear()
  with pytest.raises(hf_folder.FolderError, match="class_embed_type"):
    pretrained.open_pipeline(corrupt)


def test_components_that_do_not_fit_are_named(folders, tmp_path):
  mismatched = _copy(folders["sd15"], tmp_path, "mismatched")
  path = os.path.join(mismatched, "unet", "config.json")
  with open(path) as f:
    cfg = json.load(f)
  with open(path, "w") as f:
    json.dump({**cfg, "cross_attention_dim": 48}, f)
  with pytest.raises(hf_folder.FolderError, match="cross_attention_dim=48"):
    pretrained.open_pipeline(mismatched)
  with open(path, "w") as f:
    json.dump({**cfg, "in_channels": 3, "out_channels": 3}, f)
  pretrained.open_pipeline.cache_clear()
  with pytest.raises(hf_folder.FolderError, match="latent_channels=4"):
    pretrained.open_pipeline(mismatched)


def test_bf16_compute_keeps_float32_params_and_stays_close(folders):
  c = _config(folders["sd21"])
  base = state_lib.initial_base_params(models.build_model(c.model), 0, "random",
                                       c.model.pretrained)
  c.model.dtype = "bfloat16"
  model16 = models.build_model(c.model)
  c.model.dtype = "float32"
  model32 = models.build_model(c.model)
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 8, 8, 4), jnp.float32)
  text = jnp.asarray(rng.randn(2, 16, 32), jnp.float32)
  a = model32.apply({"params": base}, x, jnp.array([5, 900]), text)
  b = model16.apply({"params": base}, x, jnp.array([5, 900]), text)
  assert b.dtype == jnp.float32 and all(x.dtype == np.float32 for x in jax.tree.leaves(base))
  assert _max_rel_err(b, a) <= 5e-2

"""Export of the user branch as diffusers IP-Adapter weights (ppd_jax/weights/export.py).

The exported file goes through diffusers' public API (`StableDiffusionPipeline.load_ip_adapter`
on a tiny offline pipeline), and the loaded PyTorch UNet must then compute what our Flax model
computes for the same user embedding: that checks the key names, the layouts and the processor
numbering together, for both projector layouts: Full (multi-token embeddings) and ImageProjection
(one-token embeddings, K = 4 user tokens). Classifier-free guidance: ppd_jax's sampler runs the
unconditional branch with the user branch off; per-row `ip_adapter_masks` [0; 1] reproduce that
exactly in diffusers.
"""
import json
import os
import string
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from configs import ppd
from ppd_jax import models
from ppd_jax import trainer
from ppd_jax.weights import convert
from ppd_jax.weights import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIM, USER_TOKENS, TEXT_DIM = 24, 4, 32
WEIGHT_NAME = "ip-adapter_test.safetensors"

# Tiny diffusers UNets (< 1M params). SD1-like: attention in the first block only (as SD's last
# block has none). SDXL-like: linear projections, 2 layers per block, 2 transformer layers in the
# second block and the mid block, and a first block without attention; no text_time embedding.
ARCHS = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                norm_num_groups=8),
    "sdxl_like": dict(block_out_channels=(16, 32), layers_per_block=2,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=(2, 4), norm_num_groups=8,
                      transformer_layers_per_block=(1, 2), use_linear_projection=True),
}
_CONFIG_FIELDS = ("sample_size", "in_channels", "out_channels", "block_out_channels",
                  "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
                  "cross_attention_dim", "norm_num_groups", "norm_eps",
                  "transformer_layers_per_block", "use_linear_projection")


def our_config(diffusers_config, **user) -> models.UNetConfig:
  """diffusers' UNet config -> UNetConfig, field by field (the names are the same)."""
  fields = {k: diffusers_config[k] for k in _CONFIG_FIELDS}
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  return models.UNetConfig(**fields, **user)


def _tokenizer(transformers):
  """A character-level CLIP BPE (no merges): offline, and every letter is a real token."""
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  for c in string.ascii_lowercase:
    vocab[c] = len(vocab)
    vocab[c + "</w>"] = len(vocab)
  return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


@pytest.fixture(scope="module")
def parts():
  """Text encoder, tokenizer, VAE and scheduler shared by the tiny pipelines."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  tokenizer = _tokenizer(transformers)
  torch.manual_seed(0)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
      pad_token_id=1)).eval()
  vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, layers_per_block=1,
                                latent_channels=4, sample_size=8).eval()
  return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, torch=torch,
              diffusers=diffusers)


# Fixture ids: "<arch>" exports the Full projector (USER_TOKENS-token embeddings), "<arch>-single"
# the ImageProjection one (one-token embeddings made into K = 4 user tokens).
PORTED = sorted(ARCHS) + [f"{a}-single" for a in sorted(ARCHS)]


@pytest.fixture(scope="module", params=PORTED)
def ported(request, parts, tmp_path_factory):
  """A diffusers pipeline whose UNet has our exported user branch loaded, and our model."""
  torch, diffusers = parts["torch"], parts["diffusers"]
  arch, _, kind = request.param.partition("-")
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(sample_size=8, cross_attention_dim=TEXT_DIM,
                                       **ARCHS[arch]).eval()
  cfg = our_config(ref.config, user_embed_dim=USER_DIM,
                   user_tokens=1 if kind == "single" else USER_TOKENS, user_tokens_per_embedding=4)
  model = models.PersonalizedUNet(cfg)
  base_shapes, user_shapes = models.split_params(
      jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))
  base = convert.to_flax({"unet." + k: v.numpy() for k, v in ref.state_dict().items()},
                         base_shapes, what="tiny diffusers UNet")
  rng = np.random.RandomState(1)   # every user leaf non-zero (to_v_user is zero at init)
  user = jax.tree.map(lambda a: (0.3 * rng.randn(*a.shape)).astype(np.float32), user_shapes)

  folder = tmp_path_factory.mktemp(f"export_{arch}_{kind}")
  export.save_ip_adapter(str(folder / WEIGHT_NAME), export.ip_adapter_state_dict(user, cfg),
                         export.export_metadata(cfg, weight_name=WEIGHT_NAME))
  pipe = diffusers.StableDiffusionPipeline(
      vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
      unet=ref, scheduler=diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False,
                                                  timestep_spacing="trailing", steps_offset=1),
      safety_checker=None, feature_extractor=None, image_encoder=None,
      requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  pipe.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHT_NAME,
                       image_encoder_folder=None)
  apply = jax.jit(model.apply)
  ours = lambda x, t, text, u, s: np.asarray(
      apply({"params": models.merge_params(base, user)}, x, t, text, u, s))
  return types.SimpleNamespace(name=request.param, pipe=pipe, cfg=cfg, ours=ours, torch=torch,
                               model=model, base=base, user=user)


def _inputs(seed: int = 0, batch: int = 2, tokens: int = USER_TOKENS):
  rng = np.random.RandomState(seed)
  return dict(x=rng.randn(batch, 8, 8, 4).astype(np.float32),
              t=np.array([3, 781][:batch]),
              text=rng.randn(batch, 5, TEXT_DIM).astype(np.float32),
              user=rng.randn(batch, tokens, USER_DIM).astype(np.float32))


def _embeds(ported, user: np.ndarray) -> np.ndarray:
  """Our user embeddings [B, T, E] -> ip_adapter_image_embeds' tensor, one "image" per row:
  [B, 1, E] for ImageProjection (T = 1: the array as it is), [B, 1, T, E] for Full."""
  return user if ported.cfg.user_tokens == 1 else user[:, None]


def _theirs(ported, x, t, text, image_embeds, **kwargs) -> np.ndarray:
  """diffusers' UNet, NHWC in and out; image_embeds from `_embeds`."""
  torch = ported.torch
  with torch.no_grad():
    out = ported.pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                           torch.from_numpy(text),
                           added_cond_kwargs={"image_embeds": [torch.from_numpy(image_embeds)]},
                           **kwargs).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _close(got, expected, what):
  err, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
  assert err <= 1e-4 * scale, f"{what}: max error {err:.3g}, output scale {scale:.3g}"


# 1. Numbering rule and errors ---------------------------------------------------------------------

REAL = {   # the UNet configs of SD 1.5, SD 2.1 and SDXL base (only what the layer walk depends on)
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 cross_attention_dim=768),
    "sd21": dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, use_linear_projection=True),
}


@pytest.mark.parametrize("name,count", [("sd15", 16), ("sd21", 16), ("sdxl", 70)])
def test_layer_order_is_diffusers_attn_processors_order(name, count):
  """Our attn2 list == diffusers' cross-attention processors in order (built on the meta
  device: no memory, no weights), so entry k is the processor diffusers numbers 2k+1."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):
    ref = diffusers.UNet2DConditionModel(**REAL[name])
  theirs = [k.removesuffix(".processor") for k in ref.attn_processors
            if not k.endswith("attn1.processor")]
  cfg = our_config(ref.config)
  layers = export.cross_attention_layers(cfg)
  assert [_dotted(p) for p, _ in layers] == theirs and len(theirs) == count
  for (_, channels), key in zip(layers, theirs):   # the loader's hidden_size for that processor
    assert channels == ref.get_submodule(key).to_k.out_features
  if name == "sdxl":   # our Flax tree has exactly these layers (traced, not run: ~4 s)
    model = models.PersonalizedUNet(cfg)
    _, user = models.split_params(
        jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))
    attn2 = {p[:-2] for p in traverse_util.flatten_dict(user) if p[0] == "unet"}
    assert attn2 == {p for p, _ in layers}


def _dotted(path) -> str:
  """('unet', 'down_blocks_1', 'attentions_0', ...) -> 'down_blocks.1.attentions.0...'."""
  parts = []
  for name in path[1:]:
    head, _, tail = name.rpartition("_")
    parts += [head, tail] if tail.isdigit() else [name]
  return ".".join(parts)


def test_missing_extra_and_misshaped_user_params_are_named():
  cfg = models.build_model(ppd.get_config("tiny").model).config
  _, user = models.split_params(jax.eval_shape(
      lambda: models.init_params(models.PersonalizedUNet(cfg), jax.random.key(0))))
  user = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), user)
  sd = export.ip_adapter_state_dict(user, cfg)
  assert sorted(sd) == sorted(load_keys_for(cfg))
  attn = user["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]
  del attn["to_v_user"]
  with pytest.raises(convert.WeightsError, match="missing.*mid_block/attentions_0/"
                     "transformer_blocks_0/attn2/to_v_user/kernel"):
    export.ip_adapter_state_dict(user, cfg)
  attn["to_v_user"] = {"kernel": np.zeros((16, 32), np.float32)}
  attn["to_q_user"] = {"kernel": np.zeros((16, 32), np.float32)}
  with pytest.raises(convert.WeightsError, match="unexpected.*attn2/to_q_user/kernel"):
    export.ip_adapter_state_dict(user, cfg)
  del attn["to_q_user"]
  attn["to_v_user"]["kernel"] = np.zeros((16, 8), np.float32)
  with pytest.raises(convert.WeightsError, match=r"wrong shape.*to_v_user/kernel \(16, 8\)"):
    export.ip_adapter_state_dict(user, cfg)


def load_keys_for(cfg) -> list[str]:
  """The IP-Adapter file's keys: ImageProjection's (one-token embeddings) or Full's projector."""
  n = len(export.cross_attention_layers(cfg))
  if cfg.user_tokens == 1:
    proj = [f"image_proj.{m}.{w}" for m in ("proj", "norm") for w in ("weight", "bias")]
  else:
    proj = [f"image_proj.proj.{i}.{w}" for i in (0, 2, 3) for w in ("weight", "bias")]
  return proj + [f"ip_adapter.{2 * k + 1}.to_{kv}_ip.weight" for k in range(n) for kv in "kv"]


def _tiny_single(k: int):
  """The tiny config with one-token embeddings made into k user tokens, and its zero user params."""
  c = ppd.get_config("tiny").model
  c.user_tokens, c.user_tokens_per_embedding = 1, k
  cfg = models.build_model(c).config
  _, user = models.split_params(jax.eval_shape(
      lambda: models.init_params(models.PersonalizedUNet(cfg), jax.random.key(0))))
  return cfg, jax.tree.map(lambda a: np.zeros(a.shape, np.float32), user)


def test_single_token_export_has_image_projection_layout():
  cfg, user = _tiny_single(4)
  sd = export.ip_adapter_state_dict(user, cfg)
  assert sorted(sd) == sorted(load_keys_for(cfg))
  e, d = cfg.user_embed_dim, cfg.cross_attention_dim
  assert sd["image_proj.proj.weight"].shape == (4 * d, e)
  assert sd["image_proj.proj.bias"].shape == (4 * d,)
  assert sd["image_proj.norm.weight"].shape == sd["image_proj.norm.bias"].shape == (d,)
  info = export.export_metadata(cfg)
  assert info["user_tokens"] == 1 and info["user_tokens_per_embedding"] == 4
  assert f"[2p, 1, {e}]" in info["ip_adapter_image_embeds"] and "ImageProjection" in info["layout"]
  assert any("reshape(1, 1, -1)" in line for line in info["usage"])


@pytest.mark.parametrize("k", [1, 3, 8])
def test_single_token_export_refuses_k_other_than_4(k):
  """diffusers' loader builds ImageProjection with 4 tokens whatever the file holds."""
  cfg, user = _tiny_single(k)
  with pytest.raises(convert.WeightsError,
                     match=rf"model.user_tokens_per_embedding={k}.*num_image_text_embeds=4"):
    export.ip_adapter_state_dict(user, cfg)


# 2. Parity through the public diffusers API -------------------------------------------------------

def test_diffusers_unet_with_exported_user_equals_ours(ported):
  inp = _inputs(tokens=ported.cfg.user_tokens)
  for scale in (1.0, 0.6):
    ported.pipe.set_ip_adapter_scale(scale)
    theirs = _theirs(ported, inp["x"], inp["t"], inp["text"], _embeds(ported, inp["user"]))
    _close(ported.ours(inp["x"], inp["t"], inp["text"], inp["user"], scale), theirs,
           f"{ported.name} at scale {scale}")
  base = ported.ours(inp["x"], inp["t"], inp["text"], inp["user"], 0.0)
  assert np.abs(base - theirs).max() > 1e-2 * np.abs(theirs).max(), "the user branch is inert"


@pytest.mark.parametrize("ported", ["sd1", "sd1-single"], indirect=True)   # one arch is enough
def test_masks_reproduce_our_guidance_branches(ported):
  """Rows [uncond; cond] with ip_adapter_masks [0; 1]: the uncond row is our empty-caption,
  user-off branch whatever the negative embedding; without the mask it is not."""
  tokens = ported.cfg.user_tokens
  torch, inp = ported.torch, _inputs(batch=1, tokens=tokens)
  null = np.random.RandomState(5).randn(1, 5, TEXT_DIM).astype(np.float32)
  x2, t2, text2 = (np.concatenate([a, a]) for a in (inp["x"], inp["t"], inp["text"]))
  text2[0] = null[0]
  negative = np.random.RandomState(6).randn(1, tokens, USER_DIM).astype(np.float32)
  embeds = _embeds(ported, np.concatenate([negative, inp["user"]]))
  ported.pipe.set_ip_adapter_scale(0.8)
  mask = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
  theirs = _theirs(ported, x2, t2, text2, embeds,
                   cross_attention_kwargs={"ip_adapter_masks": [mask]})
  uncond = ported.ours(inp["x"], inp["t"], null, inp["user"], 0.0)
  _close(theirs[:1], uncond, "unconditional row")
  _close(theirs[1:], ported.ours(inp["x"], inp["t"], inp["text"], inp["user"], 0.8),
         "conditional row")
  unmasked = _theirs(ported, x2, t2, text2, np.zeros_like(embeds))
  assert np.abs(unmasked[:1] - uncond).max() > 1e-3 * np.abs(uncond).max()


@pytest.mark.parametrize("ported", ["sd1", "sd1-single"], indirect=True)   # one arch is enough
def test_pipeline_generates_with_exported_user(ported):
  """The call usage_snippet prints: embeds with 2p rows (the pipeline repeats them per image),
  the mask with 2n UNet rows, n = p * num_images_per_prompt."""
  torch = ported.torch
  ported.pipe.set_ip_adapter_scale(1.0)
  prompts, per_prompt = ["a red circle", "a blue square"], 2
  p, tokens = len(prompts), ported.cfg.user_tokens
  n = p * per_prompt
  user = torch.from_numpy(_embeds(ported, _inputs(seed=2, tokens=tokens)["user"][:1]))
  garbage = torch.from_numpy(_embeds(ported, _inputs(seed=3, tokens=tokens)["user"][:1]))
  mask = torch.cat([torch.zeros(n), torch.ones(n)]).view(2 * n, 1, 1, 1)

  def generate(negative, masks=True):
    embeds = torch.cat([negative.expand(p, *user.shape[1:]), user.expand(p, *user.shape[1:])])
    return ported.pipe(
        prompts, num_images_per_prompt=per_prompt, ip_adapter_image_embeds=[embeds],
        cross_attention_kwargs={"ip_adapter_masks": [mask]} if masks else None,
        num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images

  image = generate(user)
  assert image.shape == (n, 8, 8, 3) and np.isfinite(image).all()
  np.testing.assert_allclose(generate(garbage), image, atol=1e-6)   # negative masked off
  assert np.abs(generate(garbage, masks=False) - image).max() > 1e-4


# 3. The CLI on a trained run ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("export_run"))
  c = ppd.get_config("tiny")
  c.total_steps = 1
  c.checkpoint_every = 1
  c.async_checkpointing = False
  trainer.train_and_evaluate(c, workdir)
  return workdir, c


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "ppd_jax.export", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_export_cli_writes_the_ip_adapter_file(trained_run, tmp_path):
  workdir, c = trained_run
  out = tmp_path / "ipa"
  result = _cli(f"--workdir={workdir}", f"--out={out}", "--step=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "load_ip_adapter" in result.stdout and "ip_adapter_masks" in result.stdout
  tensors = load_file(str(out / "ip-adapter_ppd.safetensors"))
  cfg = models.build_model(c.model).config
  layers = export.cross_attention_layers(cfg)
  assert sorted(tensors) == sorted(load_keys_for(cfg)) and len(layers) == 4
  e, d = c.model.user_embed_dim, c.model.cross_attention_dim
  assert tensors["image_proj.proj.0.weight"].shape == (e, e)
  assert tensors["image_proj.proj.2.weight"].shape == (d, e)
  assert tensors["image_proj.proj.3.weight"].shape == (d,)
  for k, (_, channels) in enumerate(layers):
    for kv in "kv":
      w = tensors[f"ip_adapter.{2 * k + 1}.to_{kv}_ip.weight"]
      assert w.shape == (channels, d) and w.dtype == np.float32 and np.isfinite(w).all()
  info = json.loads((out / "ip-adapter_ppd.json").read_text())
  assert (info["user_embed_dim"], info["user_tokens"], info["cross_attention_dim"]) == (
      e, c.model.user_tokens, d)
  assert info["step"] == 1 and info["variant"] == "tiny" and info["num_cross_attention_layers"] == 4
  # what it prints is the JSON's script, for this run's workdir (test_sample.py runs it)
  assert "\n".join(info["usage"]) in result.stdout
  assert f"python -m ppd_jax.users.embedding --workdir={workdir} --user=ID" in result.stdout
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_export_cli_names_a_missing_workdir(tmp_path):
  result = _cli(f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'out'}")
  assert result.returncode != 0 and "--workdir" in result.stderr and "nope" in result.stderr
  assert not (tmp_path / "nope").exists() and not (tmp_path / "out").exists()


def test_sampling_page_shows_the_scripts_export_prints():
  """docs/sampling.md's two scripts are usage_snippet's text for its example runs (the Stable
  Diffusion one a pickapic_sd15 run, sampling with that config's sampler, steps and guidance)."""
  from ppd_jax.weights import export_cascade
  from ppd_jax.weights import export_usage
  with open(os.path.join(ROOT, "docs", "sampling.md")) as f:
    page = f.read()
  sd = export_usage.usage_snippet("adapter", "ip-adapter_ppd.safetensors", single_token=True,
                            base="stable-diffusion-v1-5/stable-diffusion-v1-5",
                            workdir="runs/mine", sample=ppd.get_config("pickapic_sd15").sample)
  cascade = export_cascade.usage_snippet(
      "adapter", "ppd_cascade_user.safetensors", "stabilityai/stable-cascade-prior",
      "prior_lite", "stabilityai/stable-cascade", decoder_subfolder="decoder_lite",
      workdir="runs/mine")
  for what, text in (("Stable Diffusion", sd), ("Stable Cascade", cascade)):
    assert f"```python\n{text}```" in page, f"docs/sampling.md: the {what} script differs"

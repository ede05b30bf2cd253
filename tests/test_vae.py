"""Flax AutoencoderKL vs diffusers' PyTorch AutoencoderKL: weights loaded with convert.to_flax,
encode / decode / latent scaling parity, legacy key names, config validation, the bfloat16 path.

Two tiny VAEs (< 100k params): "sd" is SD-shaped (quant convs, mid attention, no shift); "shift"
has three blocks, a shift_factor and no quant convs. Every jitted function is compiled once per
model (module-scoped fixtures).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_layout
from torch_layout import nchw, nhwc
from ppd_jax.models import vae
from ppd_jax.weights import convert

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

B = 2
SIZE = 16

TINY = {
    "sd": dict(block_out_channels=(8, 16), scaling_factor=0.18215),
    "shift": dict(block_out_channels=(8, 16, 16), scaling_factor=1.5, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False),
}


def _torch_vae(**kw):
  n = len(kw["block_out_channels"])
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=SIZE, **kw).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():   # norms away from (1, 0) and biases away from 0: every param matters
    for p in ref.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))
  return ref


def _target(module):
  return jax.eval_shape(functools.partial(vae.init_params, module), jax.random.key(0))


def _assert_close(actual, expected, rel: float = 1e-4):
  """max |a - e| <= rel * max(1, max |e|)."""
  expected = np.asarray(expected, np.float32)
  err = float(np.max(np.abs(np.asarray(actual, np.float32) - expected)))
  assert err <= rel * max(1.0, float(np.max(np.abs(expected)))), (err, np.abs(expected).max())


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request):
  """(torch model, Flax module, Flax params, images, latents) for one tiny config."""
  ref = _torch_vae(**TINY[request.param])
  module = vae.AutoencoderKL(vae.VAEConfig.from_diffusers(dict(ref.config)))
  params = convert.to_flax(torch_layout.state_dict(ref), _target(module))
  rng = np.random.RandomState(0)
  images = np.tanh(rng.randn(B, SIZE, SIZE, 3)).astype(np.float32)
  f = module.config.downsample_factor
  latents = rng.randn(B, SIZE // f, SIZE // f, 4).astype(np.float32)
  return ref, module, params, images, latents


def test_param_count_tiny(pair):
  ref = pair[0]
  assert sum(p.numel() for p in ref.parameters()) < 1_000_000


def test_encode_decode_parity(pair):
  ref, module, params, images, latents = pair
  mean, logvar = jax.jit(functools.partial(module.apply, method=vae.AutoencoderKL.encode))(
      {"params": params}, images)
  decoded = jax.jit(functools.partial(module.apply, method=vae.AutoencoderKL.decode))(
      {"params": params}, latents)
  with torch.no_grad():
    posterior = ref.encode(nchw(images)).latent_dist
    expected = ref.decode(nchw(latents)).sample
  assert mean.dtype == logvar.dtype == decoded.dtype == jnp.float32
  _assert_close(mean, nhwc(posterior.mean))
  _assert_close(logvar, nhwc(posterior.logvar))
  _assert_close(decoded, nhwc(expected))


def test_latent_scaling_matches_pipelines(pair):
  """(z - shift) * scale on encode, z = latents / scale + shift on decode (SD3 / Flux pipelines;
  SD and SDXL have shift 0), with z the posterior mean or mean + std * eps."""
  ref, module, params, images, latents = pair
  cfg = ref.config
  shift = cfg.shift_factor or 0.0
  to_latents = jax.jit(vae.images_to_latents, static_argnums=0)
  to_images = jax.jit(vae.latents_to_images, static_argnums=0)
  key = jax.random.key(3)
  eps = np.asarray(jax.random.normal(key, latents.shape, jnp.float32))
  with torch.no_grad():
    posterior = ref.encode(nchw(images)).latent_dist
    mode = (posterior.mode() - shift) * cfg.scaling_factor
    sample = (posterior.mean + posterior.std * nchw(eps) - shift) * cfg.scaling_factor
    decoded = ref.decode(nchw(latents) / cfg.scaling_factor + shift).sample
  _assert_close(to_latents(module, params, images), nhwc(mode))
  _assert_close(to_latents(module, params, images, key), nhwc(sample))
  _assert_close(to_images(module, params, latents), nhwc(decoded))


def test_bfloat16_close_to_float32(pair):
  """A smoke test of the dtype path: bf16 compute (float32 params and outputs) stays close."""
  _, module, params, images, latents = pair
  bf16 = vae.AutoencoderKL(module.config, dtype=jnp.bfloat16)
  fn = jax.jit(lambda m, p, x: m.apply({"params": p}, x), static_argnums=0)
  out32, out16 = fn(module, params, images), fn(bf16, params, images)
  assert out16.dtype == jnp.float32
  assert jax.tree.all(jax.tree.map(lambda p: p.dtype == jnp.float32, params))
  _assert_close(out16, out32, rel=0.05)     # observed ~0.025
  assert float(jnp.mean(jnp.abs(out16 - out32))) < 0.01 * max(1.0, float(jnp.abs(out32).max()))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_attention_kernels_match_diffusers(pair, impl):
  """The mid blocks' attention through attention_kernels: the CPU kernels give diffusers' numbers.

  The budget is a quarter of the full logits, so "chunked" runs 4 query chunks (its jaxpr scans).
  """
  ref, module, params, images, latents = pair
  tokens = latents.shape[1] * latents.shape[2]               # mid block: latent resolution
  budget = B * tokens * tokens * 4 // 4
  chosen = vae.AutoencoderKL(module.config, attention_impl=impl, logits_budget_bytes=budget)
  decode = lambda p, z: chosen.apply({"params": p}, z, method=vae.AutoencoderKL.decode)
  encode = lambda p, x: chosen.apply({"params": p}, x, method=vae.AutoencoderKL.encode)
  assert ("scan" in str(jax.make_jaxpr(decode)(params, latents))) == (impl == "chunked")
  mean, logvar = jax.jit(encode)(params, images)
  with torch.no_grad():
    posterior = ref.encode(nchw(images)).latent_dist
    expected = ref.decode(nchw(latents)).sample
  _assert_close(mean, nhwc(posterior.mean))
  _assert_close(logvar, nhwc(posterior.logvar))
  _assert_close(jax.jit(decode)(params, latents), nhwc(expected))


def test_attention_kernel_bounds_decode_memory():
  """Compiled VAE decode: XLA attention holds the full f32 logits [B, 1, T, T]; "auto" (over
  budget on CPU: query chunks) and "chunked" hold one chunk. One block, 8 channels, 32 x 32
  latents: T = 1024 tokens, 8 MiB of logits against ~32 KiB per activation."""
  config = vae.VAEConfig(block_out_channels=(8,), norm_num_groups=4)
  b, side = 2, 32
  full = b * (side * side) ** 2 * 4
  budget = full // 16                                         # chunks of 64 query rows
  params = jax.eval_shape(functools.partial(vae.init_params, vae.AutoencoderKL(config)),
                          jax.random.key(0))
  z = jax.ShapeDtypeStruct((b, side, side, config.latent_channels), jnp.float32)

  def temp_bytes(impl):
    module = vae.AutoencoderKL(config, attention_impl=impl, logits_budget_bytes=budget)
    decode = lambda p, z: module.apply({"params": p}, z, method=vae.AutoencoderKL.decode)
    return jax.jit(decode).lower(params, z).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes("xla") >= full
  assert temp_bytes("auto") < full / 4
  assert temp_bytes("chunked") < full / 4


# Loading ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_state():
  ref = _torch_vae(**TINY["sd"])
  module = vae.AutoencoderKL(vae.VAEConfig.from_diffusers(dict(ref.config)))
  return torch_layout.state_dict(ref), _target(module)


def _legacy(state: dict, conv_shaped: bool = False) -> dict:
  """Current keys -> the pre-0.14 AttentionBlock names (optionally 1x1-conv-shaped weights)."""
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  out = {}
  for k, v in state.items():
    for new, name in old.items():
      if f"mid_block.attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{name}.")
        if conv_shaped and v.ndim == 2:
          v = v[:, :, None, None]
    out[k] = v
  return out


def test_legacy_attention_keys_load(sd_state):
  state, target = sd_state
  expected = convert.to_flax(state, target)
  legacy = _legacy(state)
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert "decoder.mid_block.attentions.0.query.bias" in legacy
  with pytest.raises(convert.WeightsError, match="proj_attn"):
    convert.to_flax(legacy, target)
  loaded = convert.to_flax(legacy, target, rename=vae.rename_legacy_vae_key)
  conv_loaded = convert.to_flax(vae.legacy_vae_state_dict(_legacy(state, conv_shaped=True)), target)
  for got in (loaded, conv_loaded):
    assert jax.tree.all(jax.tree.map(np.array_equal, got, expected))
  assert vae.rename_legacy_vae_key("encoder.conv_in.weight") == "encoder.conv_in.weight"
  assert vae.legacy_vae_state_dict(state).keys() == state.keys()


def test_missing_and_unexpected_keys_raise(sd_state):
  state, target = sd_state
  missing = dict(state)
  del missing["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
  key = r"missing.*up_blocks[._]1\.resnets[._]0\.conv_shortcut"   # PyTorch or Flax spelling
  with pytest.raises(convert.WeightsError, match=key):
    convert.to_flax(missing, target)
  extra = dict(state, **{"encoder.mid_block.resnets.0.time_emb_proj.weight": np.zeros((16, 8))})
  with pytest.raises(convert.WeightsError, match=r"unexpected.*time_emb_proj"):
    convert.to_flax(extra, target)


def test_no_attention_tree_matches_diffusers():
  """mid_block_add_attention False: no attentions_0 on either side (eval_shape only)."""
  ref = _torch_vae(block_out_channels=(8, 16), mid_block_add_attention=False)
  module = vae.AutoencoderKL(vae.VAEConfig.from_diffusers(dict(ref.config)))
  convert.to_flax(torch_layout.state_dict(ref), _target(module))


# Config -------------------------------------------------------------------------------------------

def test_from_diffusers_reads_a_config_json():
  cfg = vae.VAEConfig.from_diffusers({
      "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0", "act_fn": "silu",
      "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
      "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
      "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
      "scaling_factor": 0.13025, "force_upcast": True, "latents_mean": None})
  assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.shift_factor == 0.0
  assert cfg.downsample_factor == 8 and cfg.use_quant_conv and cfg.mid_block_add_attention
  hash(cfg)


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
    ("act_fn", "gelu"),
    ("latents_mean", [0.0] * 4),
    ("norm_type", "spatial"),
    ("norm_num_groups", 3),
])
def test_from_diffusers_rejects_unsupported(key, value):
  base = {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
          "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 4}
  with pytest.raises(ValueError, match=key):
    vae.VAEConfig.from_diffusers(dict(base, **{key: value}))


@pytest.mark.parametrize("impl", ["chunked", ""])
def test_backbone_vae_takes_the_model_attention_impl(tmp_path, impl):
  """config.model.attention_impl reaches the SD backbone's VAE ("" means "auto": None)."""
  import tiny_sd
  from configs import ppd
  from ppd_jax import backbones
  from ppd_jax import config_validation
  from ppd_jax.weights import pretrained
  c = ppd.get_config("sd15")
  c.model.pretrained = tiny_sd.save_pipeline(str(tmp_path / "sd15"), "sd15")
  c.model.attention_impl = impl
  config_validation.prepare(c)
  pretrained.open_pipeline.cache_clear()
  assert backbones.build_backbone(c).vae.attention_impl == (impl or None)

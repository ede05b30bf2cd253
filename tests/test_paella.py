"""Flax Stage A (Paella VQ model) vs diffusers' PyTorch PaellaVQModel: weights via
paella.variables_from_state_dict (convert.to_flax), decode / encode / quantize parity, the decoder
pipeline's latents -> images, the param tree key for key, the full-size counts, the config.

One tiny model (TINY_A, ~20k params) with every parameter and BatchNorm statistic randomised
(gammas included: they are zeros at init, which would hide every MixingResidualBlock).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import torch_layout
from torch_layout import nchw, nhwc
from ppd_jax.models import paella
from ppd_jax.weights import convert

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel  # noqa: E402

TINY_A = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=2,
              embed_dim=16, latent_channels=4, num_vq_embeddings=8, scale_factor=0.3764)
FULL_COUNT, FULL_DECODER_COUNT = 18_406_894, 15_706_842   # measured on diffusers' PaellaVQModel()
TOL = 2e-5   # max |ours - torch| / max(1, max |torch|); observed <= 7e-6 in float32


def _randomised_torch_model():
  torch.manual_seed(0)
  ref = PaellaVQModel(**TINY_A).eval()
  gen = torch.Generator().manual_seed(1)
  randn = lambda shape: torch.randn(shape, generator=gen)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith("gammas"):
        p.copy_(0.7 * randn(p.shape))
      else:   # away from the defaults: BatchNorm (1, 0), biases 0
        p.add_(0.2 * randn(p.shape))
    bn = ref.down_blocks[-1][1]
    bn.running_mean.copy_(0.5 * randn(bn.running_mean.shape))
    bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=gen))
  return ref


def _rel_err(actual, expected) -> float:
  expected = np.asarray(expected, np.float32)
  err = float(np.max(np.abs(np.asarray(actual, np.float32) - expected)))
  return err / max(1.0, float(np.max(np.abs(expected))))


@pytest.fixture(scope="module")
def pair():
  ref = _randomised_torch_model()
  module = paella.PaellaVQModel(paella.PaellaConfig.from_diffusers(dict(ref.config)))
  return ref, module, paella.variables_from_state_dict(torch_layout.state_dict(ref), module)


def _apply(module, method):
  return jax.jit(functools.partial(module.apply, method=method))


# Parity -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(6, 6), (4, 7)], ids=["square", "non_square"])
def test_decode_parity(pair, hw):
  """decode == diffusers' decode(h, force_not_quantize=True): the whole decoder, both spatial
  axes distinct so that a swapped pixel-shuffle axis or a transposed-conv flip shows."""
  ref, module, variables = pair
  latents = np.random.RandomState(0).randn(2, *hw, 4).astype(np.float32)
  out = _apply(module, paella.PaellaVQModel.decode)({"params": variables["params"]}, latents)
  with torch.no_grad():
    expected = nhwc(ref.decode(nchw(latents), force_not_quantize=True).sample)
  assert out.shape == (2, 4 * hw[0], 4 * hw[1], 3) and out.dtype == jnp.float32
  assert _rel_err(out, expected) <= TOL, _rel_err(out, expected)


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(1).rand(2, 16, 24, 3).astype(np.float32)   # [0, 1], non-square


def test_encode_parity(pair, images):
  """encode == diffusers' encode(x).latents (pre-quantisation, BatchNorm on running stats)."""
  ref, module, variables = pair
  h = _apply(module, paella.PaellaVQModel.encode)(variables, images)
  with torch.no_grad():
    expected = nhwc(ref.encode(nchw(images)).latents)
  assert h.shape == (2, 4, 6, 4)
  assert _rel_err(h, expected) <= TOL, _rel_err(h, expected)


def test_quantized_reconstruction_parity(pair, images):
  """__call__ == decode(encode(x).latents, force_not_quantize=False): the codebook lookup."""
  ref, module, variables = pair
  h = _apply(module, paella.PaellaVQModel.encode)(variables, images)
  _, indices = _apply(module, paella.PaellaVQModel.quantize)(variables, h)
  out = jax.jit(module.apply)(variables, images)
  with torch.no_grad():
    h_ref = ref.encode(nchw(images)).latents
    expected = nhwc(ref.decode(h_ref, force_not_quantize=False).sample)
    ref_indices = ref.vquantizer(h_ref)[2][2].numpy()
  np.testing.assert_array_equal(np.asarray(indices).reshape(-1), ref_indices)
  assert len(np.unique(ref_indices)) > 2   # several codes in use: the argmin is exercised
  assert _rel_err(out, expected) <= TOL, _rel_err(out, expected)


def test_latents_to_images_matches_the_decoder_pipeline(pair, images):
  """StableCascadeDecoderPipeline: decode(vqgan.config.scale_factor * latents).clamp(0, 1), here
  mapped to [-1, 1]; and images_to_latents = encode((x + 1) / 2) / scale_factor."""
  ref, module, variables = pair
  latents = 2.0 * np.random.RandomState(2).randn(2, 5, 6, 4).astype(np.float32)
  out = jax.jit(paella.latents_to_images, static_argnums=0)(module, variables["params"], latents)
  x = 2.0 * images - 1.0
  to_latents = jax.jit(paella.images_to_latents, static_argnums=0)(module, variables, x)
  with torch.no_grad():
    decoded = ref.decode(ref.config.scale_factor * nchw(latents)).sample
    expected = 2.0 * nhwc(decoded.clamp(0, 1)) - 1.0
    expected_latents = nhwc(ref.encode(nchw(images)).latents / ref.config.scale_factor)
  clamped = np.mean(np.abs(expected) == 1.0)
  assert 0.05 < clamped < 0.95, clamped   # the clamp and the interior both matter
  assert _rel_err(out, expected) <= TOL, _rel_err(out, expected)
  assert _rel_err(to_latents, expected_latents) <= TOL, _rel_err(to_latents, expected_latents)


def test_bfloat16_compute_close_to_float32(pair):
  """The dtype path: bf16 compute, float32 params (even from a bf16 module's init) and outputs,
  close to float32 (observed 0.012)."""
  _, module, variables = pair
  bf16 = paella.PaellaVQModel(module.config, dtype=jnp.bfloat16)
  latents = np.random.RandomState(3).randn(1, 4, 4, 4).astype(np.float32)
  params = {"params": variables["params"]}
  out32 = _apply(module, paella.PaellaVQModel.decode)(params, latents)
  out16 = _apply(bf16, paella.PaellaVQModel.decode)(params, latents)
  assert out16.dtype == jnp.float32
  shapes = jax.eval_shape(lambda k: paella.init_variables(bf16, k), jax.random.key(0))
  assert jax.tree.all(jax.tree.map(lambda p: p.dtype == jnp.float32, shapes))   # params stay f32
  assert _rel_err(out16, out32) <= 0.05, _rel_err(out16, out32)


# Param tree ---------------------------------------------------------------------------------------

def test_param_tree_matches_the_state_dict_key_for_key(pair):
  ref, module, variables = pair
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}   # convert's leaf names
  ours = {convert.torch_key(p[:-1] + (leaf.get(p[-1], p[-1]),))
          for p in traverse_util.flatten_dict(variables["params"])}
  assert ours == {k for k, _ in ref.named_parameters()}
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  assert {convert.torch_key(p) for p in stats} == {"down_blocks.3.1.running_mean",
                                                   "down_blocks.3.1.running_var"}
  state = torch_layout.state_dict(ref)
  for key in ("up_blocks.2.gammas", "up_blocks.3.weight", "down_blocks.3.1.running_var",
              "vquantizer.embedding.weight"):
    dropped = {k: v for k, v in state.items() if k != key}
    with pytest.raises(convert.WeightsError, match=rf"missing.*{key.replace('.', '[._]')}"):
      paella.variables_from_state_dict(dropped, module)
  extra = dict(state, **{"down_blocks.3.0.bias": np.zeros(4, np.float32)})
  with pytest.raises(convert.WeightsError, match=r"unexpected.*down_blocks\.3\.0\.bias"):
    paella.variables_from_state_dict(extra, module)


def test_full_size_counts_and_tree():
  """Stable Cascade's vqgan config: the counts from jax.eval_shape (nothing allocated), and the
  tree against a full-size diffusers model built on the meta device (no memory)."""
  module = paella.PaellaVQModel(paella.PaellaConfig())
  shapes = jax.eval_shape(lambda k: paella.init_variables(module, k), jax.random.key(0))
  flat = traverse_util.flatten_dict(shapes["params"])
  count = lambda pred: sum(int(np.prod(v.shape)) for p, v in flat.items() if pred(p[0]))
  assert count(lambda _: True) == FULL_COUNT
  assert count(lambda name: name.startswith(("up_blocks", "out_block"))) == FULL_DECODER_COUNT
  with torch.device("meta"):
    ref = PaellaVQModel()
  assert sum(p.numel() for p in ref.parameters()) == FULL_COUNT
  zeros = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()}
  paella.variables_from_state_dict(zeros, module)   # raises on any missing or mis-shaped key


# Config -------------------------------------------------------------------------------------------

def test_config_from_diffusers():
  vqgan = {"_class_name": "PaellaVQModel", "_diffusers_version": "0.27.0.dev0",
           "bottleneck_blocks": 12, "embed_dim": 384, "in_channels": 3, "latent_channels": 4,
           "levels": 2, "num_vq_embeddings": 8192, "out_channels": 3, "scale_factor": 0.3764,
           "up_down_scale_factor": 2}
  cfg = paella.PaellaConfig.from_diffusers(vqgan)
  assert cfg == paella.PaellaConfig() and cfg.downsample_factor == 4
  assert cfg.c_levels == (192, 384)
  hash(cfg)


@pytest.mark.parametrize("key, value, match", [
    ("c_hidden", 384, "c_hidden.*embed_dim"),
    ("norm_type", "spatial", "norm_type"),
    ("embed_dim", 10, "embed_dim"),           # levels 3: not divisible by 4
    ("scale_factor", 0.0, "scale_factor"),
    ("levels", 0, "levels"),
])
def test_config_rejects(key, value, match):
  with pytest.raises(ValueError, match=match):
    paella.PaellaConfig.from_diffusers({**TINY_A, "levels": 3, key: value})

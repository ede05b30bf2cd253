"""UNet + user branch: shapes, the identities the DPO reference relies on, the param split, and
parity with diffusers' PyTorch UNet2DConditionModel and IPAdapterAttnProcessor2_0.

Every jitted function is compiled once per module (module-scoped fixtures); the demo config is
checked with eval_shape only, which traces without compiling.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import ppd
from ppd_jax import models
from ppd_jax.models import attention
from ppd_jax.models import unet
from ppd_jax.models import user_projector
from ppd_jax.weights import export

B = 2          # batch
TEXT_LEN = 8   # caption tokens
EXACT = 1e-6   # "exact" identities: observed 0.0 on CPU; 1e-6 leaves room for other backends


def _inputs(cfg: models.UNetConfig, seed: int = 0):
  rng = np.random.RandomState(seed)
  s = cfg.sample_size
  return dict(
      sample=jnp.asarray(rng.randn(B, s, s, cfg.in_channels), jnp.float32),
      timesteps=jnp.asarray([3, 781], jnp.int32),
      text=jnp.asarray(rng.randn(B, TEXT_LEN, cfg.cross_attention_dim), jnp.float32),
      user=jnp.asarray(rng.randn(B, cfg.user_tokens, cfg.user_embed_dim), jnp.float32))


def _randomize_user(params, seed: int = 1, std: float = 0.3):
  """Every user-branch leaf (to_v_user included) set to non-zero noise; the base is untouched."""
  base, user = models.split_params(params)
  rng = np.random.RandomState(seed)
  user = jax.tree.map(lambda a: jnp.asarray(std * rng.randn(*a.shape), a.dtype), user)
  return models.merge_params(base, user)


def _max_err(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


@pytest.fixture(scope="module")
def tiny():
  model = models.build_model(ppd.get_config("tiny").model)
  params = models.init_params(model, jax.random.key(0), batch_size=1)
  return model, params, _inputs(model.config)


@pytest.fixture(scope="module")
def fns(tiny):
  """base(params, x, t, text); user(params, x, t, text, u, scale [B]). A scalar scale is used in
  the bf16 test (broadcast_scale handles both)."""
  model = tiny[0]

  @jax.jit
  def base(params, x, t, text):
    return model.apply({"params": params}, x, t, text)

  @jax.jit
  def user(params, x, t, text, u, scale):
    return model.apply({"params": params}, x, t, text, u, scale)

  return base, user


@pytest.fixture(scope="module")
def outputs(tiny, fns):
  """Outputs shared by several tests: base, and the user branch at init and randomised."""
  _, params, inp = tiny
  base, user = fns
  args = (inp["sample"], inp["timesteps"], inp["text"])
  rand = _randomize_user(params)
  scale = lambda *s: jnp.asarray(s, jnp.float32)   # always [B]: one compile of `user`
  return dict(
      params_rand=rand,
      base=base(params, *args),
      init_user=user(params, *args, inp["user"], scale(1.0, 1.0)),
      rand_user=user(rand, *args, inp["user"], scale(1.0, 1.0)),
      rand_zero=user(rand, *args, inp["user"], scale(0.0, 0.0)),
      rand_per_example=user(rand, *args, inp["user"], scale(1.0, 0.0)))


# 1. Shapes ----------------------------------------------------------------------------------------

def test_tiny_output_shape(tiny, outputs):
  model, _, inp = tiny
  assert outputs["base"].shape == inp["sample"].shape
  assert outputs["rand_user"].shape == inp["sample"].shape
  assert outputs["base"].dtype == jnp.float32
  assert np.isfinite(np.asarray(outputs["rand_user"])).all()


def test_demo_output_shape():
  model = models.build_model(ppd.get_config("demo").model)
  inp = _inputs(model.config)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  out = jax.eval_shape(lambda p: model.apply({"params": p}, inp["sample"], inp["timesteps"],
                                             inp["text"], inp["user"], 0.5), params)
  assert out.shape == inp["sample"].shape and out.dtype == jnp.float32
  n_params = sum(x.size for x in jax.tree.leaves(params))
  assert 500_000 < n_params < 2_000_000, n_params


# 2-4. The user branch -----------------------------------------------------------------------------

def test_scale_zero_is_base_whatever_the_user_params(outputs):
  assert _max_err(outputs["rand_zero"], outputs["base"]) <= EXACT


def test_init_is_base(outputs, tiny):
  _, user = models.split_params(tiny[1])
  flat = traverse_util.flatten_dict(user)
  v_user = [v for p, v in flat.items() if p[-2] == "to_v_user"]
  assert v_user and all(not np.any(np.asarray(v)) for v in v_user)
  assert _max_err(outputs["init_user"], outputs["base"]) <= EXACT


def test_user_branch_changes_output_per_example(outputs):
  base, rand_user, mixed = outputs["base"], outputs["rand_user"], outputs["rand_per_example"]
  assert _max_err(rand_user, base) > 1e-2
  assert _max_err(mixed[0], rand_user[0]) <= EXACT   # scale 1: personalised
  assert _max_err(mixed[1], base[1]) <= EXACT        # scale 0: the base


# 5. The param split -------------------------------------------------------------------------------

def test_split_merge_round_trip(tiny):
  params = tiny[1]
  base, user = models.split_params(params)
  flat, flat_base, flat_user = (traverse_util.flatten_dict(t) for t in (params, base, user))
  expected_user = {p for p in flat
                   if p[0] == "user_projector" or p[-2] in ("to_k_user", "to_v_user")}
  assert set(flat_user) == expected_user
  assert {p for p in flat if models.is_user_param(p)} == expected_user
  assert not any(models.is_user_param(p) for p in flat_base)
  assert set(flat_base) | set(flat_user) == set(flat)
  # Every text cross-attention (attn2) has its user branch, self-attention (attn1) none.
  attn2 = {p[:-2] for p in flat if p[-3:-1] == ("attn2", "to_k")}
  assert attn2 and {p[:-2] for p in flat_user if p[-2] == "to_v_user"} == attn2
  assert {p[:-2] for p in flat_user if p[-2] == "to_k_user"} == attn2
  merged = traverse_util.flatten_dict(models.merge_params(base, user))
  assert merged.keys() == flat.keys()
  assert all(merged[p] is flat[p] for p in flat)
  with pytest.raises(ValueError):
    models.merge_params(params, user)


def test_is_user_param_accepts_jax_key_paths(tiny):
  leaves = jax.tree_util.tree_leaves_with_path(tiny[1])
  n_user = sum(models.is_user_param(path) for path, _ in leaves)
  assert n_user == len(jax.tree.leaves(models.split_params(tiny[1])[1]))


def test_build_model_converts_and_rejects():
  cfg = ppd.get_config("tiny").model
  cfg.block_out_channels = [16, 32]
  cfg.dtype = "bfloat16"
  model = models.build_model(cfg)
  assert model.config.block_out_channels == (16, 32) and model.config.dtype == jnp.bfloat16
  cfg.unknown_field = 1
  with pytest.raises(ValueError, match="unknown_field"):
    models.build_model(cfg)


# 6. Parity with diffusers (PyTorch) ---------------------------------------------------------------

def torch_to_flax(state_dict) -> dict[tuple[str, ...], np.ndarray]:
  """diffusers state dict -> flat Flax params: `a.0.b.weight` -> ('a_0', 'b', 'kernel' | 'scale').

  Conv weights OIHW -> HWIO, Linear weights [out, in] -> [in, out], 1-D weights are norm scales.
  """
  flat = {}
  for key, w in state_dict.items():
    *mods, leaf = key.split(".")
    path = []
    for m in mods:
      if m.isdigit():
        path[-1] += "_" + m
      else:
        path.append(m)
    w = w.detach().numpy()
    if leaf == "weight":
      if w.ndim == 4:
        leaf, w = "kernel", w.transpose(2, 3, 1, 0)
      else:
        leaf, w = ("kernel", w.T) if w.ndim == 2 else ("scale", w)
    flat[tuple(path) + (leaf,)] = w
  return flat


def _perturb_torch(module, seed: int = 0):
  """Norm scales and biases default to 1 and 0; make them random so they are tested too."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))


def test_unet_parity_with_diffusers(tiny, fns):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  model, params, inp = tiny
  cfg = model.config
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(
      sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
      down_block_types=cfg.down_block_types, up_block_types=cfg.up_block_types,
      attention_head_dim=cfg.attention_head_dim, cross_attention_dim=cfg.cross_attention_dim,
      norm_num_groups=cfg.norm_num_groups).eval()
  _perturb_torch(ref)
  converted = {("unet",) + k: v for k, v in torch_to_flax(ref.state_dict()).items()}
  base, user = models.split_params(params)
  flat_base = traverse_util.flatten_dict(base)
  assert set(converted) == set(flat_base)     # 1:1 key mapping, nothing missing or extra
  for k, v in converted.items():
    assert v.shape == flat_base[k].shape, k
  ported = models.merge_params(
      traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in converted.items()}), user)

  with torch.no_grad():
    expected = ref(torch.from_numpy(np.asarray(inp["sample"]).transpose(0, 3, 1, 2)),
                   torch.from_numpy(np.asarray(inp["timesteps"])).long(),
                   torch.from_numpy(np.asarray(inp["text"]))).sample.numpy().transpose(0, 2, 3, 1)
  got = fns[0](ported, inp["sample"], inp["timesteps"], inp["text"])
  scale = float(np.abs(expected).max())
  assert _max_err(got, expected) <= 1e-4 * scale, (_max_err(got, expected), scale)


def test_user_attention_parity_with_ip_adapter_processor():
  """attn2 + user branch == diffusers' Attention with IPAdapterAttnProcessor2_0 (export target)."""
  torch = pytest.importorskip("torch")
  from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
  heads, dim_head, cross, n_user, scale = 2, 8, 12, 3, 0.7
  dim = heads * dim_head
  torch.manual_seed(0)
  ref = Attention(query_dim=dim, cross_attention_dim=cross, heads=heads, dim_head=dim_head).eval()
  proc = IPAdapterAttnProcessor2_0(hidden_size=dim, cross_attention_dim=cross, num_tokens=(n_user,),
                                   scale=scale)
  ref.set_processor(proc)
  _perturb_torch(ref)
  rng = np.random.RandomState(0)
  x, text, user = (rng.randn(B, n, d).astype(np.float32)
                   for n, d in ((5, dim), (4, cross), (n_user, cross)))
  with torch.no_grad():
    expected = ref(torch.from_numpy(x),
                   encoder_hidden_states=(torch.from_numpy(text), [torch.from_numpy(user)])).numpy()
  sd = {k.replace("processor.to_k_ip.0", "to_k_user").replace("processor.to_v_ip.0", "to_v_user"): v
        for k, v in ref.state_dict().items()}
  params = traverse_util.unflatten_dict(
      {k: jnp.asarray(v) for k, v in torch_to_flax(sd).items()})
  got = attention.Attention(heads, dim_head).apply({"params": params}, x, text, user, scale)
  assert _max_err(got, expected) <= 1e-5


def test_single_token_projector_equals_diffusers_image_projection():
  """SingleTokenUserProjector == diffusers' ImageProjection (IP-Adapter's ImageProjModel) with the
  same weights: tokens = LayerNorm(reshape(W e + b, [K, D])). K = 3 != D keeps a transposed
  reshape from passing by symmetry."""
  torch = pytest.importorskip("torch")
  from diffusers.models.embeddings import ImageProjection
  e, d, k = 10, 12, 3
  torch.manual_seed(0)
  ref = ImageProjection(image_embed_dim=e, cross_attention_dim=d, num_image_text_embeds=k).eval()
  _perturb_torch(ref)
  sd = {key.replace("image_embeds.", "proj."): v for key, v in ref.state_dict().items()}
  params = traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in torch_to_flax(sd).items()})
  user = np.random.RandomState(0).randn(B, 1, e).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(user[:, 0])).numpy()
  got = user_projector.SingleTokenUserProjector(d, k).apply({"params": params}, user)
  assert got.shape == (B, k, d) == expected.shape
  assert _max_err(got, expected) <= 1e-5


def _to_k_user_grads(tiny, k: int) -> list[jax.Array]:
  """d loss / d to_k_user kernel for every cross-attention of the tiny UNet, one-token user
  embeddings made into k user tokens, user params random (to_v_user != 0). The base is the tiny
  fixture's (it does not depend on the user branch); the user params are only traced for shapes."""
  model = models.PersonalizedUNet(dataclasses.replace(tiny[0].config, user_tokens=1,
                                                      user_tokens_per_embedding=k))
  base = models.split_params(tiny[1])[0]
  user_shapes = models.split_params(
      jax.eval_shape(lambda: models.init_params(model, jax.random.key(0))))[1]
  user = models.split_params(_randomize_user(models.merge_params(base, user_shapes)))[1]
  inp = _inputs(model.config)
  target = jnp.asarray(np.random.RandomState(3).randn(*inp["sample"].shape), jnp.float32)

  def loss(user):
    out = model.apply({"params": models.merge_params(base, user)}, inp["sample"],
                      inp["timesteps"], inp["text"], inp["user"], 1.0)
    return jnp.mean((out - target) ** 2)

  grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(user))
  out = [g for p, g in grads.items() if p[-2] == "to_k_user"]
  assert len(out) == len(export.cross_attention_layers(model.config)) == 4
  return out


@pytest.mark.parametrize("k", [1, 4])
def test_one_token_embedding_trains_every_to_k_user(tiny, k):
  """The bug and its fix: one user key makes softmax(q k_user) = 1 for every query, so every
  to_k_user gets exactly zero gradient (K = 1, the old one-token behaviour); the same embedding
  made into K = 4 tokens gives every to_k_user a non-zero gradient."""
  norms = [float(jnp.abs(g).max()) for g in _to_k_user_grads(tiny, k)]
  if k == 1:
    assert all(n == 0.0 for n in norms), norms
  else:
    assert all(n > 1e-6 for n in norms), norms


# 7. Remat and bfloat16 ----------------------------------------------------------------------------

def test_bf16_remat_forward_close_to_fp32(tiny, outputs):
  model, _, inp = tiny
  lowp = models.PersonalizedUNet(
      dataclasses.replace(model.config, dtype=jnp.bfloat16, remat=True))
  got = jax.jit(lowp.apply)({"params": outputs["params_rand"]}, inp["sample"], inp["timesteps"],
                            inp["text"], inp["user"], 1.0)
  expected = outputs["rand_user"]
  assert got.dtype == jnp.float32 and got.shape == expected.shape
  scale = float(jnp.abs(expected).max())
  assert _max_err(got, expected) <= 0.05 * scale, (_max_err(got, expected), scale)


def test_remat_gradients_match():
  """remat changes what the backward pass stores, never the gradient. Checked on the mid block
  (ResnetBlock2D + Transformer2DModel with the user branch): the whole UNet's backward would cost
  two more ~10 s compiles."""
  def block(remat):
    settings = unet.BlockSettings(groups=4, eps=1e-5, use_linear_projection=False,
                                  dtype=jnp.float32, remat=remat, attention_impl=None)
    return unet.UNetMidBlock2DCrossAttn(heads=4, transformer_layers=1, s=settings)

  rng = np.random.RandomState(0)
  x, temb, text, user = (jnp.asarray(rng.randn(*s), jnp.float32)
                         for s in ((B, 4, 4, 16), (B, 32), (B, 3, 8), (B, 2, 8)))
  shapes = jax.eval_shape(block(False).init, jax.random.key(0), x, temb, text, user, 1.0)["params"]
  params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.randn(*a.shape), a.dtype), shapes)

  def grads(remat):
    def loss(p, x):
      return jnp.mean(block(remat).apply({"params": p}, x, temb, text, user, 0.8) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  plain, rematted = grads(False), grads(True)
  assert max(jax.tree.leaves(jax.tree.map(_max_err, plain, rematted))) <= 1e-6
  _, user_grads = models.split_params(plain[0])
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(user_grads))


def test_an_unknown_model_family_is_named():
  """models/family.py is the one place that picks the family: a misspelt one is refused by name,
  never built as a UNet."""
  from ppd_jax.models import family
  with pytest.raises(ValueError, match=r"config.model.family.*'unte'"):
    family.build_model({"family": "unte"})

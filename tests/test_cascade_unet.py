"""StableCascadeUNet (Stage C and B) in Flax against diffusers' PyTorch model, its helpers against
torch, the PPD user-branch identities, and full-size parameter counts (eval_shape, no weights).

Tiny random models come from tests/tiny_cascade.py (every param random, GRN included). Each jitted
function compiles once per module (module fixtures); full configs are only traced (eval_shape).
"""
import math
import types

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import tiny_cascade as tc
from ppd_jax.models import cascade
from ppd_jax.models import cascade_ops
from ppd_jax.models import personalized
from ppd_jax.models import personalized_cascade as pc
from ppd_jax.weights import convert

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

B = 2
PARITY = 1e-5    # float32 parity with diffusers (measured 7e-7 .. 9e-7)
EXACT = 1e-6     # "exact" identities: observed 0.0 on CPU
USER_DIM = 12    # the tiny user embedding's width


def _max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _inputs(config: dict, size, seed: int = 0) -> dict:
  """NHWC numpy inputs: Stage C gets text and image tokens, Stage B an effnet map."""
  rng = np.random.RandomState(seed)
  f = lambda *s: rng.randn(*s).astype(np.float32)
  out = dict(sample=f(B, *size, config["in_channels"]),
             timestep_ratio=np.array([0.9, 0.25], np.float32), clip_text_pooled=f(B, 1, 24))
  if config.get("clip_text_in_channels"):
    out.update(clip_text=f(B, 7, 24), clip_img=f(B, 1, 16))
  if config.get("effnet_in_channels"):
    out["effnet"] = f(B, 6, 5, 16)
  return out


def _torch_forward(model, inp: dict) -> np.ndarray:
  kw = {k: tc.nchw(v) if v.ndim == 4 else torch.from_numpy(v) for k, v in inp.items()}
  with torch.no_grad():
    return tc.nhwc(model(**kw).sample)


@pytest.fixture(scope="module")
def stage_c():
  model = tc.patch_r_embedding(tc.torch_unet(tc.TINY_C))
  cfg = cascade.config_from_diffusers(tc.TINY_C, user_embed_dim=USER_DIM)
  state = tc.state_dict(model)
  inp = _inputs(tc.TINY_C, (6, 5))                           # non-square
  return dict(cfg=cfg, state=state, params=tc.flax_params(state, cfg), inp=inp,
              ref=_torch_forward(model, inp))


@pytest.fixture(scope="module")
def stage_b():
  model = tc.patch_r_embedding(tc.torch_unet(tc.TINY_B, seed=1))
  cfg = cascade.config_from_diffusers(tc.TINY_B)
  state = tc.state_dict(model)
  return dict(cfg=cfg, state=state, params=tc.flax_params(state, cfg), torch=model)


@pytest.fixture(scope="module")
def user_model(stage_c):
  """PersonalizedCascade on TINY_C: jitted base (no user branch) and user (scale [B]) calls."""
  model = pc.PersonalizedCascade(stage_c["cfg"])
  base = jax.jit(lambda p, inp: model.apply({"params": p}, **pc.call_inputs(inp)))
  user = jax.jit(lambda p, inp, u, s: model.apply({"params": p}, **pc.call_inputs(inp),
                                                  user_embedding=u, user_scale=s))
  return model, base, user


@pytest.fixture(scope="module")
def outputs(stage_c, user_model):
  model, base, user = user_model
  inp, base_params = stage_c["inp"], {"unet": stage_c["params"]}
  init = pc.init_user_params(model, jax.random.key(0))
  rng = np.random.RandomState(3)
  rand = jax.tree.map(lambda a: 0.3 * rng.randn(*a.shape).astype(np.float32), init)
  u = rng.randn(B, 1, USER_DIM).astype(np.float32)
  s = lambda *v: np.asarray(v, np.float32)                  # always [B]: one compile of `user`
  with_init, with_rand = (personalized.merge_params(base_params, x) for x in (init, rand))
  return dict(init=init, params=with_init,
              base=base(base_params, inp), init_user=user(with_init, inp, u, s(1, 1)),
              rand_user=user(with_rand, inp, u, s(1, 1)),
              rand_zero=user(with_rand, inp, u, s(0, 0)),
              rand_rows=user(with_rand, inp, u, s(1, 0)))


# 1. Parity with diffusers -------------------------------------------------------------------------

def test_stage_c_matches_diffusers(stage_c, outputs):
  out = outputs["base"]
  assert out.shape == stage_c["ref"].shape and out.dtype == jnp.float32
  assert np.abs(stage_c["ref"]).max() > 0.5
  assert _max_err(out, stage_c["ref"]) < PARITY


@pytest.mark.parametrize("size", [(32, 48), (36, 20)])   # (36, 20): skip 9x5, x 8x4: resized
def test_stage_b_matches_diffusers(stage_b, size):
  inp = _inputs(tc.TINY_B, size, seed=2)
  ref = _torch_forward(stage_b["torch"], inp)
  model = cascade.StableCascadeUNet(stage_b["cfg"])
  out = jax.jit(lambda p, i: model.apply({"params": p}, **i))(stage_b["params"], inp)
  assert out.shape == ref.shape and np.abs(ref).max() > 0.5
  assert _max_err(out, ref) < PARITY


# 2. The param tree is the state dict --------------------------------------------------------------

@pytest.mark.parametrize("stage", ["stage_c", "stage_b"])
def test_param_tree_is_the_state_dict(stage, request):
  s = request.getfixturevalue(stage)
  flat = traverse_util.flatten_dict(s["params"])
  assert len(flat) == len(s["state"])
  assert sum(v.size for v in flat.values()) == sum(v.size for v in s["state"].values())
  dropped = "down_blocks.1.0.channelwise.2.gamma"
  state = {k: v for k, v in s["state"].items() if k != dropped}
  with pytest.raises(convert.WeightsError, match=f"1 missing key.*{dropped}"):
    tc.flax_params(state, s["cfg"])


def test_stage_b_upscalers_need_transposed(stage_b):
  target = pc.abstract_params(cascade.StableCascadeUNet(stage_b["cfg"]))
  with pytest.raises(convert.WeightsError, match=r"wrong shape.*up_upscalers\.1\.1\.weight"):
    convert.to_flax(stage_b["state"], target)


# 3. Config ----------------------------------------------------------------------------------------

def test_config_from_diffusers_and_refusals():
  cfg = cascade.config_from_diffusers(cascade.PRIOR_LITE, dtype="bfloat16")
  assert cfg.block_types_per_layer == (("SDCascadeResBlock", "SDCascadeTimestepBlock",
                                        "SDCascadeAttnBlock"),) * 2
  assert cfg.dtype == jnp.bfloat16 and cfg.switch_level == (False,)
  old = {"_class_name": "StableCascadeUnet", "_diffusers_version": "0.26.0.dev0", "c_in": 16,
         "c_hidden": [2048, 2048], "level_config": ["CTA", "CTA"], "blocks": [[8, 24], [24, 8]]}
  with pytest.raises(ValueError, match="0.26 format"):
    cascade.config_from_diffusers(old)
  with pytest.raises(ValueError, match="0.26 format"):
    cascade.config_from_diffusers({"c_hidden": [8, 8]})
  bad = [({"foo": 1}, "not supported"), ({"switch_level": [True]}, "switch_level"),
         ({"clip_image_in_channels": None}, "go together"),
         ({"block_types_per_layer": [["SDCascadeResBlock"], ["Conv"]]}, "block types"),
         ({"_class_name": "UNet2DConditionModel"}, "not a StableCascadeUNet")]
  for change, message in bad:
    with pytest.raises(ValueError, match=message):
      cascade.config_from_diffusers({**cascade.PRIOR_LITE, **change})
  with pytest.raises(ValueError, match="overrides"):
    cascade.config_from_diffusers(cascade.PRIOR_LITE, in_channels=4)


# 4. Helpers alone against torch -------------------------------------------------------------------

@pytest.mark.parametrize("p", [2, 3])
def test_pixel_unshuffle_and_shuffle_match_torch(p):
  x = np.random.RandomState(p).randn(2, 4 * p, 3 * p, 5).astype(np.float32)
  ref = tc.nhwc(torch.nn.functional.pixel_unshuffle(tc.nchw(x), p))
  down = cascade_ops.pixel_unshuffle(jnp.asarray(x), p)
  assert _max_err(down, ref) == 0.0
  up_ref = tc.nhwc(torch.nn.functional.pixel_shuffle(tc.nchw(ref), p))
  assert _max_err(cascade_ops.pixel_shuffle(down, p), up_ref) == 0.0 and _max_err(up_ref, x) == 0


@pytest.mark.parametrize("src,dst", [((6, 5), (16, 12)), ((8, 4), (9, 5)), ((7, 9), (3, 4)),
                                     ((1, 3), (4, 1)), ((5, 5), (5, 2))])
def test_resize_align_corners_matches_torch(src, dst):
  x = np.random.RandomState(0).randn(2, *src, 3).astype(np.float32)
  ref = torch.nn.functional.interpolate(tc.nchw(x), size=dst, mode="bilinear", align_corners=True)
  assert _max_err(cascade_ops.resize_align_corners(jnp.asarray(x), dst), tc.nhwc(ref)) < 1e-6


def _torch_r_embedding(r: np.ndarray, dim: int) -> np.ndarray:
  """diffusers' own get_timestep_ratio_embedding, unpatched (it only reads self.config)."""
  fake = types.SimpleNamespace(config=types.SimpleNamespace(timestep_ratio_embedding_dim=dim))
  return diffusers.StableCascadeUNet.get_timestep_ratio_embedding(fake, torch.from_numpy(r)).numpy()


R_GRID = np.linspace(0, 1, 1001).astype(np.float32)


@pytest.mark.parametrize("dim", [64, 65])
def test_r_embedding_matches_unpatched_torch(dim):
  ours = np.asarray(cascade_ops.timestep_ratio_embedding(R_GRID, dim))
  ref = _torch_r_embedding(R_GRID, dim)
  assert ours.shape == ref.shape == (len(R_GRID), dim) and ours.dtype == np.float32
  assert _max_err(ours, ref) < 1e-3                        # measured 1.2e-4: exp's last ulp
  assert _max_err(ours[R_GRID <= 0.01], ref[R_GRID <= 0.01]) < 1e-5


def test_r_embedding_matches_float64_formula():
  """emb(r) = [sin, cos](r 1e4 exp(-ln(1e4) i / 31)), i < 32, in float64. float32 rounding of
  the phase (up to 1e4 rad) costs up to ~1e-3; small r is exact to float32."""
  phase = R_GRID.astype(np.float64)[:, None] * 1e4 * np.exp(-np.log(1e4) / 31 * np.arange(32))
  exact = np.concatenate([np.sin(phase), np.cos(phase)], axis=1)
  ours = np.asarray(cascade_ops.timestep_ratio_embedding(R_GRID, 64))
  assert _max_err(ours, exact) < 1e-3                      # measured 6.0e-4
  assert _max_err(ours[R_GRID <= 0.01], exact[R_GRID <= 0.01]) < 1e-5


# 5. The user branch -------------------------------------------------------------------------------

def test_init_is_base(outputs):
  flat = traverse_util.flatten_dict(outputs["init"])
  v_user = [v for p, v in flat.items() if p[-2] == "to_v_user"]
  assert v_user and all(not np.any(np.asarray(v)) for v in v_user)
  assert _max_err(outputs["init_user"], outputs["base"]) <= EXACT


def test_scale_zero_is_base_whatever_the_user_params(outputs):
  assert _max_err(outputs["rand_zero"], outputs["base"]) <= EXACT


def test_user_branch_changes_output_per_row(outputs):
  base, rand_user, rows = outputs["base"], outputs["rand_user"], outputs["rand_rows"]
  assert _max_err(rand_user, base) > 1e-2
  assert _max_err(rows[0], rand_user[0]) <= EXACT           # scale 1: personalised
  assert _max_err(rows[1], base[1]) <= EXACT                # scale 0: the base


def test_split_params_takes_exactly_the_user_branch(outputs):
  params = outputs["params"]
  base, user = personalized.split_params(params)
  flat_user = traverse_util.flatten_dict(user)
  attn = {p[:-2] for p in traverse_util.flatten_dict(base) if p[-2:] == ("to_q", "kernel")}
  assert len(attn) == 6                                     # TINY_C: 3 down, 3 up
  for leaf in ("to_k_user", "to_v_user"):
    assert {p[:-2] for p in flat_user if p[-2] == leaf} == attn
  others = {p for p in flat_user if p[-2] not in ("to_k_user", "to_v_user")}
  assert others and all(p[0] == "user_projector" for p in others)
  assert len(flat_user) == 2 * len(attn) + len(others)      # kernels only: no bias
  assert {p for p in flat_user if p[-2] in ("to_k_user", "to_v_user")} == {
      p for p in flat_user if p[-1] == "kernel" and p[0] != "user_projector"}


# 6. Dtype and remat (traced only) -----------------------------------------------------------------

def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _eqns(sub)


def test_bf16_keeps_params_r_embedding_and_norms_in_float32(stage_c):
  cfg = cascade.config_from_diffusers(tc.TINY_C, dtype="bfloat16")
  model = cascade.StableCascadeUNet(cfg)
  params = pc.abstract_params(model)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  jaxpr = jax.make_jaxpr(lambda p, i: model.apply({"params": p}, **i))(params, stage_c["inp"])
  eqns = list(_eqns(jaxpr.jaxpr))
  dtypes = lambda names: {v.aval.dtype for e in eqns if e.primitive.name in names
                          for v in e.invars}
  assert dtypes(("sin", "cos", "sqrt", "rsqrt")) == {jnp.dtype(jnp.float32)}
  assert jnp.dtype(jnp.bfloat16) in dtypes(("dot_general", "conv_general_dilated"))
  assert jaxpr.out_avals[0].dtype == jnp.float32


def test_bf16_model_embeds_r_in_float32():
  """r 1e4 in bf16 would move the phases by up to 28 rad (9500 -> 9472): r must stay float32."""
  model = cascade.StableCascadeUNet(cascade.config_from_diffusers(tc.TINY_C, dtype="bfloat16"))
  got = model.apply({}, R_GRID, method=cascade.StableCascadeUNet.ratio_embedding)
  emb = lambda r: cascade_ops.timestep_ratio_embedding(r, 64)
  want = jnp.concatenate([emb(R_GRID), emb(0 * R_GRID), emb(0 * R_GRID)], axis=-1)
  assert got.dtype == jnp.float32 and _max_err(got, want) == 0.0


def test_remat_traces_the_same_tree_under_grad(stage_c):
  cfg = cascade.config_from_diffusers(tc.TINY_C, user_embed_dim=USER_DIM, remat=True)
  model = pc.PersonalizedCascade(cfg)
  params = pc.abstract_params(model)
  assert jax.tree.structure(params) == jax.tree.structure(pc.abstract_params(
      pc.PersonalizedCascade(stage_c["cfg"])))
  u = jnp.zeros((B, 1, USER_DIM))
  loss = lambda p: model.apply({"params": p}, **pc.call_inputs(stage_c["inp"]),
                               user_embedding=u).sum()
  remat = lambda f: [e for e in _eqns(jax.make_jaxpr(f)(params).jaxpr)
                     if e.primitive.name.startswith(("remat", "checkpoint"))]
  assert len(remat(loss)) == 18                             # TINY_C: 9 blocks down, 9 up
  assert remat(jax.grad(loss))                              # and the gradient traces


# 7. Full-size parameter counts (eval_shape: no init, no weights) ----------------------------------

def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,count,tensors", [
    ("PRIOR", 3_589_103_632, 1550), ("PRIOR_LITE", 1_030_785_040, 782),
    ("DECODER", 1_562_941_136, 1726), ("DECODER_LITE", 699_471_248, 970)])
def test_full_size_base_counts(name, count, tensors):
  model = cascade.StableCascadeUNet(cascade.config_from_diffusers(getattr(cascade, name)))
  shapes = pc.abstract_params(model)
  assert (_count(shapes), len(jax.tree.leaves(shapes))) == (count, tensors)


def test_stage_c_lite_user_branch_count():
  """PPD's "about 150M": K/V user projections in all 32 attention blocks of Stage C lite."""
  cfg = cascade.config_from_diffusers(cascade.PRIOR_LITE)
  base, user = personalized.split_params(pc.abstract_params(pc.PersonalizedCascade(cfg)))
  assert _count(base) == 1_030_785_040
  flat = traverse_util.flatten_dict(user)
  kv = {p: v for p, v in flat.items() if p[0] != "user_projector"}
  assert len(kv) == 2 * 32 and _count(kv) == 150_994_944 == 32 * 2 * 1536 ** 2
  e, k, d = cfg.user_embed_dim, cfg.user_tokens_per_embedding, cfg.conditioning_dim
  assert _count(user) - _count(kv) == e * k * d + k * d + 2 * d   # one-token projector + LN

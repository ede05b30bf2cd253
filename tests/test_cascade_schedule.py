"""Stable Cascade's continuous schedule and DDPM-Wuerstchen sampler against diffusers and gdf.

The schedule is checked against DDPMWuerstchenScheduler.add_noise and a float64 closed form, r
against gdf's CosineTNoiseCond formula (re-written here in numpy), and the sampler step for step
against diffusers' pipeline loop on a toy model that is the same linear function of (x, r,
conditioning) in torch and jax, with the same per-step noise injected on both sides.
"""
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppd_jax.diffusion import cascade_sampler as csamp
from ppd_jax.diffusion import cascade_schedule as cs

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm_wuerstchen  # noqa: E402

S = 0.008
SCHED = cs.CascadeSchedule()
# The schedule's functions as training and sampling run them, under jit (also far cheaper on CPU
# than compiling each small op eagerly); the schedule and any sizes are static.
J = types.SimpleNamespace(
    **{name: jax.jit(getattr(cs, name), static_argnums=0) for name in (
        "alphas_cumprod", "noise_cond", "model_r", "log_snr", "p2_loss_weight", "add_noise",
        "predict_x0", "diffuse")},
    draw_t=jax.jit(cs.draw_t, static_argnums=(0, 2)),
    draw_t_and_noise=jax.jit(cs.draw_t_and_noise, static_argnums=(0, 2)))
SHAPE = (2, 4, 6, 6)                       # NCHW, as diffusers' pipelines hold latents
_rng = np.random.default_rng(0)
F = _rng.standard_normal(SHAPE[1:]).astype(np.float32)
G = _rng.standard_normal(SHAPE[1:]).astype(np.float32)
COND = np.array([1.0, -0.7], np.float32)   # a per-example conditioning scalar
UNCOND = np.array([0.1, 0.4], np.float32)
# t across [0, 1], with both clamped ends and the points next to them.
T_GRID = np.concatenate([[0.0, 1e-4, 1e-3, 0.002, 0.0023, 0.003, 0.05, 0.5, 0.95, 0.99, 0.9935,
                          0.9936, 0.999, 1.0], np.linspace(0, 1, 101)]).astype(np.float32)


def _abar64(t):
  """abar(t) in float64, with the clamp."""
  t = np.asarray(t, np.float64)
  c0 = math.cos(S / (1 + S) * math.pi / 2) ** 2
  return np.clip(np.cos((t + S) / (1 + S) * np.pi / 2) ** 2 / c0, 1e-4, 0.9999)


def _gdf_noise_cond64(abar):
  """gdf CosineTNoiseCond(logSNR) in float64: var = sigmoid(logSNR) = abar, clamped to [0, 1];
  t = acos(sqrt(var min_var)) / (pi/2) (1 + s) - s, clamped to [0, 1]."""
  var = np.clip(np.asarray(abar, np.float64), 0, 1)
  min_var = math.cos(S / (1 + S) * math.pi / 2) ** 2
  return np.clip(np.arccos(np.sqrt(var * min_var)) / (np.pi / 2) * (1 + S) - S, 0, 1)


# ---------------------------------------------------------------------------------- schedule


def test_abar_and_add_noise_match_diffusers_and_float64():
  ref = diffusers.DDPMWuerstchenScheduler()
  t = torch.from_numpy(T_GRID)
  n = len(T_GRID)
  ones, zeros = torch.ones(n, 1), torch.zeros(n, 1)
  # add_noise(1, 0) = sqrt(abar); add_noise(0, 1) = sqrt(1 - abar): the scheduler's abar, clamp
  # included, through its public API.
  ref_a = ref.add_noise(ones, zeros, t).numpy()[:, 0]
  ref_b = ref.add_noise(zeros, ones, t).numpy()[:, 0]
  abar = np.asarray(J.alphas_cumprod(SCHED, T_GRID))
  assert abar.dtype == np.float32
  # Near abar = 0.9999 one float32 ulp of abar (6e-8) is 3e-4 of 1 - abar, in both codes, so
  # abar and 1 - abar are compared in absolute terms, at about an ulp.
  np.testing.assert_allclose(abar, ref_a.astype(np.float64) ** 2, rtol=0, atol=3e-7)
  np.testing.assert_allclose(1 - abar, ref_b.astype(np.float64) ** 2, rtol=0, atol=2e-7)
  np.testing.assert_allclose(abar, _abar64(T_GRID), rtol=2e-6, atol=1e-7)
  assert abar.max() == np.float32(0.9999) and abar.min() == np.float32(1e-4)

  x0 = _rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
  eps = _rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
  ours = np.asarray(J.add_noise(SCHED, x0, eps, T_GRID))
  assert ours.dtype == np.float32
  np.testing.assert_allclose(
      ours, ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), t).numpy(), atol=2e-5)
  a64 = _abar64(T_GRID)[:, None, None, None]
  np.testing.assert_allclose(ours, np.sqrt(a64) * x0 + np.sqrt(1 - a64) * eps, atol=1e-5)
  # bf16 inputs still get float32 coefficients and a float32 result.
  bf = J.add_noise(SCHED, jnp.asarray(x0, jnp.bfloat16), jnp.asarray(eps, jnp.bfloat16), T_GRID)
  assert bf.dtype == jnp.float32


def test_noise_cond_matches_gdf_and_inverts_abar():
  dense = np.concatenate([T_GRID, np.linspace(0, 1, 10001, dtype=np.float32)])
  abar = np.asarray(J.alphas_cumprod(SCHED, dense))
  r = np.asarray(J.noise_cond(SCHED, abar))
  assert r.dtype == np.float32
  # Same float32 abar in, gdf's formula in float64 out: to 1e-7 (a float32 acos near abar = 1
  # would be off by 1.4e-6, hence the atan2 form).
  np.testing.assert_allclose(r, _gdf_noise_cond64(abar), rtol=0, atol=3e-7)
  # Also over abar itself, both clamps of the formula included (abar outside [0, 1]).
  a = np.array([-0.1, 0.0, 1e-4, 0.01, 0.3, 0.9, 0.9999, 1.0, 1.2], np.float32)
  r_a = np.asarray(J.noise_cond(SCHED, a))
  np.testing.assert_allclose(r_a, _gdf_noise_cond64(a), rtol=0, atol=3e-7)
  # Exactly in [0, 1] (float32 rounding alone puts abar = 1 at r = -1e-9 without the clamp).
  np.testing.assert_array_equal(r_a[[1, -2]], [1.0, 0.0])
  assert r_a.min() == 0.0 and r_a.max() == 1.0
  # Away from the clamped ends r = t.
  mid = T_GRID[(T_GRID > 0.003) & (T_GRID < 0.99)]
  np.testing.assert_allclose(np.asarray(J.model_r(SCHED, mid)), mid, rtol=0, atol=2e-6)

  # The clamped ends, where abar hits 1e-4 / 0.9999: r is the t at which the clamp starts.
  t_hi, t_lo = _gdf_noise_cond64(1e-4), _gdf_noise_cond64(0.9999)
  assert round(t_hi, 5) == 0.99358 and round(t_lo, 5) == 0.00226
  hi = np.array([t_hi + 1e-5, 0.9936, 0.999, 1.0], np.float32)
  lo = np.array([0.0, 1e-4, 0.001, 0.002, t_lo - 1e-5], np.float32)
  np.testing.assert_allclose(np.asarray(J.model_r(SCHED, hi)), t_hi, atol=2e-6)
  np.testing.assert_allclose(np.asarray(J.model_r(SCHED, lo)), t_lo, atol=2e-6)


def test_log_snr_and_p2_weight():
  a64 = _abar64(T_GRID)
  lam = np.log(a64 / (1 - a64))
  # At abar = 0.9999 float32 leaves 1 - abar with 4 digits, so log SNR there with ~3e-4.
  np.testing.assert_allclose(np.asarray(J.log_snr(SCHED, T_GRID)), lam, rtol=0, atol=6e-4)
  w = np.asarray(J.p2_loss_weight(SCHED, T_GRID))
  # gdf P2LossWeight(k=1, gamma=1, s=1): (1 + exp(logSNR))^-1 = 1 - abar.
  # Absolute, at ~2 ulp of abar: at t ~ 0 the float32 1 - 0.9999 is 1.00017e-4, here and in gdf.
  np.testing.assert_allclose(w, 1 / (1 + np.exp(lam)), rtol=0, atol=2e-7)
  one = np.float32(1)
  at_one = T_GRID.tolist().index(1.0)
  assert w[0] == one - np.float32(0.9999) and w[at_one] == one - np.float32(1e-4)


def test_target_predict_x0_and_diffuse():
  x0 = jnp.asarray(_rng.standard_normal(SHAPE), jnp.float32)
  eps = jnp.asarray(_rng.standard_normal(SHAPE), jnp.float32)
  t = jnp.array([0.2, 0.999])
  x_t = J.add_noise(SCHED, x0, eps, t)
  np.testing.assert_array_equal(cs.training_target(SCHED, x0, eps, t), eps)
  np.testing.assert_allclose(np.asarray(J.predict_x0(SCHED, eps, x_t, t)), x0, atol=2e-5)
  # diffuse = (add_noise, model_r, eps, p2), as the DPO step consumes them.
  got = J.diffuse(SCHED, x0, eps, t)
  want = (x_t, J.model_r(SCHED, t), eps, J.p2_loss_weight(SCHED, t))
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32 and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got[1]), [0.2, 0.99358], atol=1e-5)


def test_draw_t_range_clamp_and_determinism():
  key = jax.random.key(3)
  t = np.asarray(J.draw_t(SCHED, key, 200_000))
  assert t.shape == (200_000,) and t.dtype == np.float32
  assert t.min() >= 0.001 and t.max() <= 1.0
  assert t.min() < 0.0011                    # the +0.001 shift: the draw starts at t_min ...
  # ... and the 0.1% of draws with 1 - U + 0.001 > 1 are clamped to exactly 1.
  assert abs((t == 1.0).mean() - 0.001) < 3e-4
  assert abs(t.mean() - (0.5 + 0.001 - 0.001**2 / 2)) < 3e-3
  np.testing.assert_array_equal(t[:8], np.asarray(J.draw_t(SCHED, key, 200_000))[:8])

  t2, eps = J.draw_t_and_noise(SCHED, jax.random.key(4), (5, 16, 3, 3))
  assert t2.shape == (5,) and eps.shape == (5, 16, 3, 3) and eps.dtype == jnp.float32
  assert np.all((np.asarray(t2) > 0.001) & (np.asarray(t2) <= 1.0))


def test_from_diffusers_config():
  assert cs.from_diffusers_config(dict(diffusers.DDPMWuerstchenScheduler().config)) == SCHED
  with pytest.raises(ValueError, match="scaler=2.0"):
    cs.from_diffusers_config({"_class_name": "DDPMWuerstchenScheduler", "scaler": 2.0})
  with pytest.raises(ValueError, match="DDIMScheduler"):
    cs.from_diffusers_config({"_class_name": "DDIMScheduler"})


# ----------------------------------------------------------------------------------- sampler


def _toy_jax(x, r, c):
  """eps = (0.3 + 0.6 r) x + (0.5 r^2 - 0.2) F + c G: linear in x, depends on r and cond."""
  e = lambda v: v[:, None, None, None]
  r = r.astype(jnp.float32)
  return e(0.3 + 0.6 * r) * x + e(0.5 * r**2 - 0.2) * jnp.asarray(F) + e(c) * jnp.asarray(G)


def _toy_torch(x, r, c):
  e = lambda v: v[:, None, None, None]
  r = r.float()
  f, g = torch.from_numpy(F), torch.from_numpy(G)
  return e(0.3 + 0.6 * r) * x + e(0.5 * r**2 - 0.2) * f + e(c) * g


def _noise(num_steps, seed=1):
  return np.random.default_rng(seed).standard_normal((num_steps,) + SHAPE).astype(np.float32)


def _reference(monkeypatch, x_T, noise, num_steps, g, t_dtype=torch.float32):
  """The Stable Cascade pipeline loop with DDPMWuerstchenScheduler (step 7-9 of both pipelines),
  the model evaluated on each half directly, z injected through the scheduler's randn_tensor."""
  sched = diffusers.DDPMWuerstchenScheduler()
  draws = iter(torch.from_numpy(z) for z in noise)
  monkeypatch.setattr(scheduling_ddpm_wuerstchen, "randn_tensor", lambda *a, **k: next(draws))
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(np.array(x_T)) * sched.init_noise_sigma
  seen, latents = [], []
  for t in sched.timesteps[:-1]:
    r = t.expand(x.shape[0]).to(t_dtype)
    eps = _toy_torch(x, r, torch.from_numpy(COND))
    if g > 1:
      eps = torch.lerp(_toy_torch(x, r, torch.from_numpy(UNCOND)), eps, g)
    x = sched.step(model_output=eps, timestep=r, sample=x).prev_sample
    seen.append(r.float().numpy())
    latents.append(x.numpy())
  assert next(draws, None) is None           # one z per step, the last one drawn and unused
  return np.stack(seen), np.stack(latents)


def _x_T(seed=0):
  return jnp.asarray(np.random.default_rng(100 + seed).standard_normal(SHAPE), jnp.float32)


def _run(num_steps, g, noise, **kw):
  return csamp.sample(_toy_jax, _x_T(), None, num_steps, g, jnp.asarray(COND),
                      jnp.asarray(UNCOND), noise=noise, return_trajectory=True, **kw)


def _assert_steps_close(ours, ref, t, rtol=2e-6):
  """Every step's latents to rtol of that step's largest |x| (the toy's x grows to ~100)."""
  assert ours.shape == ref.shape
  for i in range(len(ref)):
    scale = max(1.0, float(np.abs(ref[i]).max()))
    err = float(np.abs(ours[i] - ref[i]).max())
    assert err <= rtol * scale, f"step {i} (t={t[i]}): max abs err {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("num_steps", [1, 3, 10, 20, 25, 1000])
def test_timesteps_match_diffusers_bit_for_bit(num_steps):
  ref = diffusers.DDPMWuerstchenScheduler()
  ref.set_timesteps(num_steps)
  got = csamp.timesteps(num_steps)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, ref.timesteps.numpy())


@pytest.mark.parametrize("g", [4.0, 0.0])    # the prior's CFG default; the decoder's (no CFG)
def test_whole_loop_matches_diffusers_step_by_step(monkeypatch, g):
  n = 20
  noise = _noise(n)
  ref_r, ref_x = _reference(monkeypatch, _x_T(), noise, n, g)
  x_0, traj = _run(n, g, jnp.asarray(noise))
  np.testing.assert_array_equal(np.asarray(traj["r"]), ref_r)   # r = t, 1.0 at the first step
  assert ref_r[0, 0] == 1.0 and np.asarray(traj["r"]).dtype == np.float32
  ours = np.asarray(traj["latents"])
  np.testing.assert_array_equal(np.asarray(x_0), ours[-1])
  _assert_steps_close(ours, ref_x, ref_r[:, 0])


def test_bf16_timesteps_match_the_bf16_pipeline(monkeypatch):
  """The bf16 pipelines round t to bf16 for the model and for abar_t (prev_t stays float32)."""
  n = 10
  noise = _noise(n, seed=2)
  ref_r, ref_x = _reference(monkeypatch, _x_T(), noise, n, 4.0, t_dtype=torch.bfloat16)
  _, traj = _run(n, 4.0, jnp.asarray(noise), timestep_dtype=jnp.bfloat16)
  assert traj["r"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(traj["r"], np.float32), ref_r)
  _assert_steps_close(np.asarray(traj["latents"]), ref_x, ref_r[:, 0])


def test_last_step_lands_on_the_mean():
  """The step to t = 0 adds no noise: x_0 does not depend on the last z (and does on the others)."""
  n = 5
  noise = _noise(n)
  other = noise.copy()
  other[-1] = 100.0
  a, _ = _run(n, 0.0, jnp.asarray(noise))
  b, _ = _run(n, 0.0, jnp.asarray(other))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other[-2] += 1.0
  c, _ = _run(n, 0.0, jnp.asarray(other))
  assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3


def test_cfg_batch_order_and_lerp():
  """eps_fn sees [x; x], [r; r] and [cond; uncond]; eps = uncond + w (cond - uncond)."""
  x = _x_T(5)
  r = jnp.array([0.7, 0.7], jnp.float32)
  both = csamp.cfg_batch({"c": jnp.asarray(COND)}, {"c": jnp.asarray(UNCOND)})
  np.testing.assert_array_equal(np.asarray(both["c"]), np.concatenate([COND, UNCOND]))
  seen = {}

  def eps_fn(xx, rr, cc):
    seen.update(x=xx, r=rr)
    return _toy_jax(xx, rr, cc["c"])

  got = csamp.guided_eps(eps_fn, x, r, both, 4.0)
  np.testing.assert_array_equal(np.asarray(seen["x"]), np.concatenate([x, x]))
  np.testing.assert_array_equal(np.asarray(seen["r"]), np.concatenate([r, r]))
  e_c, e_u = _toy_jax(x, r, jnp.asarray(COND)), _toy_jax(x, r, jnp.asarray(UNCOND))
  np.testing.assert_allclose(np.asarray(got), np.asarray(e_u + 4.0 * (e_c - e_u)), atol=1e-5)
  ref = torch.lerp(torch.from_numpy(np.array(e_u)), torch.from_numpy(np.array(e_c)), 4.0)
  np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=1e-5)


def _batch_probe(x, r, c):
  """The toy eps, checking that x, r and the conditioning share one batch size."""
  assert x.shape[0] == r.shape[0] == c.shape[0]
  return _toy_jax(x, r, c)


def test_cfg_only_above_one():
  """w <= 1 evaluates cond only (the pipelines' rule), so w = 0.5 is not a lerp; w > 1 is."""
  n = 4
  noise = jnp.asarray(_noise(n))
  run = lambda g, **kw: np.asarray(csamp.sample(
      _batch_probe, _x_T(), None, n, g, jnp.asarray(COND), jnp.asarray(UNCOND), noise=noise,
      **kw))
  cond_only = run(0.0)
  np.testing.assert_array_equal(run(0.5), cond_only)
  np.testing.assert_array_equal(run(1.0), cond_only)
  assert np.abs(run(0.5, cfg=True) - cond_only).max() > 1e-3
  np.testing.assert_allclose(run(1.0, cfg=True), cond_only, atol=1e-5)   # lerp at w = 1
  with pytest.raises(ValueError, match="needs `uncond`"):
    csamp.sample(_toy_jax, _x_T(), None, n, 4.0, jnp.asarray(COND), noise=noise)
  with pytest.raises(ValueError, match="cfg=True or cfg=False"):
    jax.jit(lambda g: csamp.sample(_toy_jax, _x_T(), None, n, g, jnp.asarray(COND),
                                   jnp.asarray(UNCOND), noise=noise))(4.0)


def test_key_noise_compiles_once_and_nests_in_jit():
  """z_i = normal(split(key, N)[i]); one compile serves every key and w; a jitted caller may
  close over its params and pass a traced w with cfg=True."""
  n = 6
  key = jax.random.key(7, impl="rbg")   # any key type; rbg compiles far faster than threefry on CPU
  normal = jax.jit(lambda k: jax.random.normal(k, SHAPE, jnp.float32))
  z = jnp.stack([normal(k) for k in jax.random.split(key, n)])   # not vmap: rbg isn't invariant
  before = csamp._sample._cache_size()
  a = csamp.sample(_toy_jax, _x_T(), key, n, 4.0, jnp.asarray(COND), jnp.asarray(UNCOND))
  b = csamp.sample(_toy_jax, _x_T(), jax.random.key(8, impl="rbg"), n, 6.0, jnp.asarray(COND),
                   jnp.asarray(UNCOND))
  assert csamp._sample._cache_size() == before + 1
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  _assert_steps_close(np.asarray(a)[None], np.asarray(_run(n, 4.0, z)[0])[None], [0.0])

  @jax.jit
  def outer(scale, g):
    eps_fn = lambda x, r, c: scale * _toy_jax(x, r, c)
    return csamp.sample(eps_fn, _x_T(), key, n, g, jnp.asarray(COND), jnp.asarray(UNCOND),
                        cfg=True)

  _assert_steps_close(np.asarray(outer(1.0, 4.0))[None], np.asarray(a)[None], [0.0])


def test_model_r_noise_cond_is_gdfs():
  n = 20
  _, traj = _run(n, 0.0, jnp.asarray(_noise(n)), model_r="noise_cond")
  t = csamp.timesteps(n)[:-1]
  want = _gdf_noise_cond64(_abar64(t))
  np.testing.assert_allclose(np.asarray(traj["r"])[:, 0], want, atol=2e-6)
  assert round(float(traj["r"][0, 0]), 5) == 0.99358
  with pytest.raises(ValueError, match="model_r='sigma'"):
    _run(n, 0.0, jnp.asarray(_noise(n)), model_r="sigma")

"""DDIM sampler against diffusers' DDIMScheduler run step by step with the same fake model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppd_jax.diffusion import samplers
from ppd_jax.diffusion import schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 8, 8, 4)   # layout is irrelevant: the fake model is elementwise


def _reference_scheduler(prediction_type="epsilon", **kw):
  kw = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, **kw}
  return diffusers.DDIMScheduler(
      num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
      beta_end=0.012, clip_sample=False, prediction_type=prediction_type, **kw)


def _fake_jax(x, t, c):
  """out = 0.1 x + c * sin(t / 100): deterministic, depends on x, t and the conditioning."""
  return 0.1 * x + c["scale"][:, None, None, None] * jnp.sin(t / 100.0)[:, None, None, None]


def _fake_torch(x, t, scale):
  return 0.1 * x + scale[:, None, None, None] * torch.sin(torch.as_tensor(t, dtype=torch.float32)
                                                            / 100.0)


def _reference_sample(sched, x_T, num_steps, cond, uncond=None, g=1.0, noises=None, eta=0.0):
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(np.array(x_T))
  cond, uncond = torch.tensor(cond), None if uncond is None else torch.tensor(uncond)
  for i, t in enumerate(sched.timesteps):
    out = _fake_torch(x, t, cond)
    if g != 1.0:
      out_u = _fake_torch(x, t, uncond)
      out = out_u + g * (out - out_u)
    noise = None if noises is None else torch.from_numpy(np.asarray(noises[i]))
    x = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
  return x.numpy()


def _x_T(seed=0):
  return jax.random.normal(jax.random.key(seed), SHAPE, jnp.float32)


COND = np.array([1.0, -0.5], np.float32)
UNCOND = np.array([0.2, 0.3], np.float32)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps,offset", [(10, 1), (7, 0), (50, 1), (1, 1)])
def test_timesteps_match_diffusers(spacing, num_steps, offset):
  ref = _reference_scheduler(timestep_spacing=spacing, steps_offset=offset)
  ref.set_timesteps(num_steps)
  ours = samplers.ddim_timesteps(schedules.make_schedule(), num_steps, spacing, offset)
  np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_timesteps_reject_bad_arguments():
  s = schedules.make_schedule()
  with pytest.raises(ValueError, match="timestep_spacing='uniform'"):
    samplers.ddim_timesteps(s, 10, "uniform")
  with pytest.raises(ValueError, match="num_steps=1001"):
    samplers.ddim_timesteps(s, 1001)


def test_prev_timesteps_rules():
  s = schedules.make_schedule()
  ts = samplers.ddim_timesteps(s, 4, "linspace")            # [999, 666, 333, 0]
  np.testing.assert_array_equal(samplers.ddim_prev_timesteps(s, ts), [749, 416, 83, -250])
  np.testing.assert_array_equal(samplers.ddim_prev_timesteps(s, ts, "grid"), [666, 333, 0, -1])
  with pytest.raises(ValueError, match="prev_timestep='next'"):
    samplers.ddim_prev_timesteps(s, ts, "next")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,set_alpha_to_one", [
    ("leading", False), ("leading", True), ("trailing", False), ("linspace", False)])
def test_trajectory_matches_diffusers(prediction_type, spacing, set_alpha_to_one):
  s = schedules.make_schedule(prediction_type=prediction_type)
  x_T = _x_T()
  ours = samplers.sample(
      _fake_jax, s, x_T, {"scale": jnp.asarray(COND)}, num_steps=10, guidance_scale=1.0,
      rng=None, timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one)
  ref = _reference_sample(
      _reference_scheduler(prediction_type, timestep_spacing=spacing,
                           set_alpha_to_one=set_alpha_to_one), x_T, 10, COND)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5 * max(scale, 1.0))


def test_guidance_combines_uncond_and_cond_in_one_call():
  s = schedules.make_schedule()
  x_T, g = _x_T(1), 7.5
  batches = []

  def apply_fn(x, t, c):
    batches.append((x.shape[0], t.shape[0]))
    return _fake_jax(x, t, c)

  cond, uncond = {"scale": jnp.asarray(COND)}, {"scale": jnp.asarray(UNCOND)}
  ours = samplers.sample(apply_fn, s, x_T, cond, uncond, num_steps=10, guidance_scale=g)
  assert batches and set(batches) == {(4, 4)}   # one 2B call per step (traced once by scan)
  ref = _reference_sample(_reference_scheduler(), x_T, 10, COND, UNCOND, g=g)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5 * np.abs(ref).max())

  batches.clear()
  samplers.sample(apply_fn, s, x_T, cond, uncond, num_steps=10, guidance_scale=1.0)
  assert set(batches) == {(2, 2)}               # g == 1: cond only
  with pytest.raises(ValueError, match="uncond"):
    samplers.sample(apply_fn, s, x_T, cond, None, num_steps=10, guidance_scale=3.0)


def test_jit_end_to_end_with_closed_over_params_and_traced_guidance():
  s = schedules.make_schedule(prediction_type="v_prediction")
  x_T = _x_T(2)
  cond, uncond = {"scale": jnp.asarray(COND)}, {"scale": jnp.asarray(UNCOND)}

  def apply(params, x, t, c):
    return params["w"] * _fake_jax(x, t, c)

  @functools.partial(jax.jit, static_argnames="num_steps")
  def run(params, schedule, x_T, cond, uncond, g, num_steps):
    return samplers.sample(functools.partial(apply, params), schedule, x_T, cond, uncond,
                           num_steps=num_steps, guidance_scale=g)

  params = {"w": jnp.float32(1.0)}
  jitted = run(params, s, x_T, cond, uncond, jnp.float32(4.0), num_steps=10)
  eager = samplers.sample(functools.partial(apply, params), s, x_T, cond, uncond,
                          num_steps=10, guidance_scale=4.0)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
  # A traced g == 1 takes the 2B path and still equals the cond-only chain.
  traced_one = run(params, s, x_T, cond, uncond, jnp.float32(1.0), num_steps=10)
  cond_only = samplers.sample(functools.partial(apply, params), s, x_T, cond,
                              num_steps=10, guidance_scale=1.0)
  np.testing.assert_allclose(np.asarray(traced_one), np.asarray(cond_only), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stochastic_step_matches_diffusers(prediction_type):
  s = schedules.make_schedule(prediction_type=prediction_type)
  ref = _reference_scheduler(prediction_type)
  ref.set_timesteps(10)
  rng = np.random.default_rng(3)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  out = rng.standard_normal(SHAPE).astype(np.float32)
  z = rng.standard_normal(SHAPE).astype(np.float32)
  for t in (901, 1):   # a middle step and the final one (t_prev < 0)
    expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=0.7,
                        variance_noise=torch.from_numpy(z)).prev_sample.numpy()
    ours = samplers.ddim_step(s, out, t, t - 100, x, 0.7, z)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def test_eta_is_seeded_and_deterministic():
  s = schedules.make_schedule()
  x_T, cond = _x_T(4), {"scale": jnp.asarray(COND)}
  run = functools.partial(samplers.sample, _fake_jax, s, x_T, cond, num_steps=10)
  a = run(rng=jax.random.key(0), eta=1.0)
  b = run(rng=jax.random.key(0), eta=1.0)
  c = run(rng=jax.random.key(1), eta=1.0)
  d = run(rng=jax.random.key(0), eta=0.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert not np.allclose(np.asarray(a), np.asarray(d))
  assert np.all(np.isfinite(np.asarray(a)))
  with pytest.raises(ValueError, match="rng"):
    run(eta=0.5)

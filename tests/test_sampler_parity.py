"""DDIM, Euler and DPM-Solver++ 2M against diffusers' schedulers, step for step, on a fake model.

The fake model is the same elementwise function in jax and torch of (x, float t, conditioning), so
the whole trajectory (every step's latents and the timesteps the model saw) can be compared with
diffusers' loop: set_timesteps, latents = x_T * init_noise_sigma, then per step
scale_model_input -> model -> (guidance) -> step.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppd_jax.diffusion import dpm_solver
from ppd_jax.diffusion import euler
from ppd_jax.diffusion import samplers
from ppd_jax.diffusion import schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# diffusers' set_timesteps calls np.array on a torch tensor; numpy 2 warns about it, harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 8, 8, 4)
FIXED = np.random.default_rng(0).standard_normal(SHAPE[1:]).astype(np.float32)
COND = np.array([1.0, -0.5], np.float32)
UNCOND = np.array([0.2, 0.3], np.float32)
SPACINGS = [("leading", 1), ("trailing", 0), ("linspace", 0)]   # (timestep_spacing, steps_offset)
REFERENCE = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
}


def _fake_jax(x, t, c):
  """out = a(t) x + b(t) scale F: a(t) = 0.05 + 0.9 t / 1000 (eps ~ x_t at high noise)."""
  a = (0.05 + 0.9 * t / 1000.0)[:, None, None, None]
  b = (0.3 * jnp.sin(t / 150.0))[:, None, None, None] * c["scale"][:, None, None, None]
  return a * x + b * jnp.asarray(FIXED)


def _fake_torch(x, t, scale):
  t = torch.as_tensor(t, dtype=torch.float32)
  return (0.05 + 0.9 * t / 1000.0) * x + (0.3 * torch.sin(t / 150.0)) * scale[:, None, None, None] \
      * torch.from_numpy(FIXED)


def _reference_scheduler(sampler, prediction_type, spacing, offset, **kw):
  if sampler == "ddim":
    kw = {"set_alpha_to_one": False, "clip_sample": False, **kw}
  return REFERENCE[sampler](
      num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
      beta_end=0.012, prediction_type=prediction_type, timestep_spacing=spacing,
      steps_offset=offset, **kw)


def _reference(sched, x_T, num_steps, g=1.0):
  """diffusers' pipeline loop -> (timesteps the model saw [n] float32, latents after each step)."""
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(np.array(x_T)) * sched.init_noise_sigma
  cond, uncond = torch.from_numpy(COND), torch.from_numpy(UNCOND)
  seen, latents = [], []
  for t in sched.timesteps:
    x_in = sched.scale_model_input(x, t)
    out = _fake_torch(x_in, t, cond)
    if g != 1.0:
      out_u = _fake_torch(x_in, t, uncond)
      out = out_u + g * (out - out_u)
    x = sched.step(out, t, x).prev_sample
    seen.append(np.float32(t))
    latents.append(x.numpy())
  return np.asarray(seen, np.float32), np.stack(latents)


@functools.partial(jax.jit, static_argnames=("sampler", "num_steps", "spacing", "offset", "opts"))
def _ours(schedule, x_T, g, *, sampler, num_steps, spacing, offset, opts=()):
  """The schedule and g are traced jit arguments, as in generation.py; compiled once per config."""
  return samplers.sample(
      _fake_jax, schedule, x_T, {"scale": jnp.asarray(COND)}, {"scale": jnp.asarray(UNCOND)},
      num_steps=num_steps, guidance_scale=g, sampler=sampler, timestep_spacing=spacing,
      steps_offset=offset, return_trajectory=True, **dict(opts))


def _x_T(seed=0):
  return jax.random.normal(jax.random.key(seed), SHAPE, jnp.float32)


def _compare(sampler, prediction_type, num_steps, spacing, offset, g=1.0, **opts):
  s = schedules.make_schedule(prediction_type=prediction_type)
  x_T = _x_T(num_steps)
  ref_t, ref_x = _reference(
      _reference_scheduler(sampler, prediction_type, spacing, offset, **opts), x_T, num_steps, g)
  # g == 1 exactly goes through the traced-g (2B) path here; it equals the cond-only chain.
  x_0, traj = _ours(s, x_T, jnp.float32(g), sampler=sampler, num_steps=num_steps, spacing=spacing,
                    offset=offset, opts=tuple(sorted(opts.items())))
  assert traj["timesteps"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(traj["timesteps"]), ref_t)
  ours = np.asarray(traj["latents"])
  assert ours.shape == ref_x.shape
  np.testing.assert_array_equal(np.asarray(x_0), ours[-1])
  for i in range(num_steps):
    scale = max(1.0, float(np.abs(ref_x[i]).max()))
    err = float(np.abs(ours[i] - ref_x[i]).max())
    assert err <= 1e-4 * scale, f"step {i} (t={ref_t[i]}): max abs err {err:.3g}, scale {scale:.3g}"
  assert np.all(np.isfinite(ours))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("num_steps", [4, 25])
def test_trajectory_matches_diffusers(sampler, spacing, offset, prediction_type, num_steps):
  _compare(sampler, prediction_type, num_steps, spacing, offset)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("num_steps", [1, 10])
def test_other_step_counts(sampler, num_steps):
  _compare(sampler, "epsilon", num_steps, "leading", 1)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_guidance_matches_formula_around_diffusers(sampler):
  _compare(sampler, "epsilon", 10, "trailing", 0, g=7.5)


@pytest.mark.parametrize("num_steps", [10, 20])   # lower_order_final applies only below 15 steps
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_final_sigma_min(sampler, num_steps):
  _compare(sampler, "v_prediction", num_steps, "linspace", 0, final_sigmas_type="sigma_min")


def test_dpm_lower_order_final_off():
  _compare("dpmpp_2m", "epsilon", 10, "linspace", 0, final_sigmas_type="sigma_min",
           lower_order_final=False)


def test_dpm_order_per_step():
  second = dpm_solver.second_order_steps
  np.testing.assert_array_equal(second(4, "zero", True), [False, True, True, False])
  np.testing.assert_array_equal(second(20, "zero", False)[[0, 1, -2, -1]], [0, 1, 1, 0])
  np.testing.assert_array_equal(second(14, "sigma_min", True)[[0, 1, -1]], [0, 1, 0])
  np.testing.assert_array_equal(second(15, "sigma_min", True)[[0, 1, -1]], [0, 1, 1])
  np.testing.assert_array_equal(second(1, "sigma_min", True), [False])


@pytest.mark.parametrize("spacing,offset", SPACINGS + [("leading", 0), ("trailing", 1)])
@pytest.mark.parametrize("num_steps", [1, 7, 10, 50, 999])
def test_timesteps_match_diffusers(spacing, offset, num_steps):
  s = schedules.make_schedule()
  for sampler, ours in (("euler", euler.euler_timesteps), ("dpmpp_2m", dpm_solver.dpm_timesteps)):
    ref = _reference_scheduler(sampler, "epsilon", spacing, offset)
    ref.set_timesteps(num_steps)
    got = ours(s, num_steps, spacing, offset)
    np.testing.assert_array_equal(got, ref.timesteps.numpy())
    assert got.dtype == ref.timesteps.numpy().dtype


def test_apply_fn_gets_float32_timesteps_and_euler_scaled_inputs():
  s = schedules.make_schedule()
  seen = {}

  def apply_fn(x, t, c):
    seen["t"] = t.dtype
    return _fake_jax(x, t, c)

  for sampler in samplers.SAMPLERS:
    seen.clear()
    samplers.sample(apply_fn, s, _x_T(), {"scale": jnp.asarray(COND)}, num_steps=2,
                    sampler=sampler)
    assert seen["t"] == jnp.float32, sampler


def test_options_are_checked_per_sampler():
  s = schedules.make_schedule()
  run = functools.partial(samplers.sample, _fake_jax, s, _x_T(), {"scale": jnp.asarray(COND)},
                          num_steps=3)
  # No-op values of DDIM's options are fine for every sampler (generation.py always passes them).
  a = run(sampler="euler", eta=0.0, clip_sample=False, rng=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(run(sampler="euler")))
  with pytest.raises(ValueError, match="eta=0.5"):
    run(sampler="euler", eta=0.5)
  with pytest.raises(ValueError, match="clip_sample=True"):
    run(sampler="dpmpp_2m", clip_sample=True)
  with pytest.raises(ValueError, match="set_alpha_to_one"):
    run(sampler="dpmpp_2m", set_alpha_to_one=False)
  with pytest.raises(ValueError, match="final_sigmas_type"):
    run(sampler="ddim", final_sigmas_type="zero")
  with pytest.raises(ValueError, match="lower_order_final"):
    run(sampler="euler", lower_order_final=True)
  with pytest.raises(ValueError, match="sampler='heun'"):
    run(sampler="heun")
  with pytest.raises(ValueError, match="final_sigmas_type='max'"):
    run(sampler="euler", final_sigmas_type="max")
  with pytest.raises(ValueError, match="timestep_spacing='uniform'"):
    run(sampler="dpmpp_2m", timestep_spacing="uniform")


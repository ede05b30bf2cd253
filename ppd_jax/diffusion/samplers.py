"""Sampling with classifier-free guidance as one jitted loop (lax.scan over the steps).

`sample` runs DDIM (here), Euler (euler.py) or DPM-Solver++ 2M (dpm_solver.py), each matching the
diffusers scheduler of the same name step for step from the same N(0, 1) noise x_T.

DDIM conventions follow diffusers' DDIMScheduler so that a model sampled here and there from the
same x_T lands on the same latents:
  * timesteps: `ddim_timesteps` ("leading" + steps_offset=1 is what Stable Diffusion configs use);
  * the step from t goes to t_prev = t - T // num_steps, whatever the spacing (diffusers' rule;
    `prev_timestep="grid"` instead steps to the next timestep on the grid, which differs only for
    "linspace" spacing or "trailing" when num_steps does not divide T);
  * the last step (t_prev < 0) lands on abar = 1 if set_alpha_to_one else abar_0. Stable Diffusion
    configs set it False, so that is the default here (diffusers' class default is True).
"""
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ppd_jax.diffusion import dpm_solver
from ppd_jax.diffusion import euler
from ppd_jax.diffusion import sampler_lib
from ppd_jax.diffusion import schedules as schedules_lib

TIMESTEP_SPACINGS = sampler_lib.TIMESTEP_SPACINGS
PREV_TIMESTEP_RULES = ("diffusers", "grid")


def ddim_timesteps(schedule: schedules_lib.NoiseSchedule,
                   num_steps: int,
                   timestep_spacing: str = "leading",
                   steps_offset: int = 1) -> np.ndarray:
  """The descending timesteps the sampler visits (int64, length num_steps); host-side, static.

  leading:  t_i = i * (T // n) + steps_offset
  trailing: t_i = round(T - i * T / n) - 1
  linspace: t_i = round(linspace(0, T - 1, n))          (steps_offset is ignored, as in diffusers)
  """
  n, total = int(num_steps), schedule.num_train_timesteps
  if not 1 <= n <= total:
    raise ValueError(f"num_steps={n} must be in [1, num_train_timesteps={total}].")
  if timestep_spacing == "leading":
    ts = (np.arange(n) * (total // n)).round()[::-1].astype(np.int64) + steps_offset
  elif timestep_spacing == "trailing":
    ts = np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
  elif timestep_spacing == "linspace":
    ts = np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
  else:
    raise ValueError(f"timestep_spacing={timestep_spacing!r} is not supported; expected one of "
                     f"{TIMESTEP_SPACINGS}.")
  return ts.copy()


def ddim_prev_timesteps(schedule: schedules_lib.NoiseSchedule,
                        timesteps: np.ndarray,
                        rule: str = "diffusers") -> np.ndarray:
  """Where each step lands; negative means "the end" (see module docstring)."""
  timesteps = np.asarray(timesteps, np.int64)
  if rule == "diffusers":
    return timesteps - schedule.num_train_timesteps // len(timesteps)
  if rule == "grid":
    return np.concatenate([timesteps[1:], [-1]]).astype(np.int64)
  raise ValueError(f"prev_timestep={rule!r} is not supported; expected one of "
                   f"{PREV_TIMESTEP_RULES}.")


def _per_example(values: jnp.ndarray, ndim: int) -> jnp.ndarray:
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def ddim_step(schedule: schedules_lib.NoiseSchedule,
              model_output,
              t,
              t_prev,
              x_t,
              eta=0.0,
              noise=None,
              *,
              set_alpha_to_one: bool = False,
              clip_sample: bool = False,
              clip_sample_range: float = 1.0):
  """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12).

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z
    sigma  = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))

  t, t_prev: scalars or [B]; t_prev < 0 means the final step. `noise` (z, shaped like x_t) is needed
  only for eta > 0. As in diffusers (use_clipped_model_output=False), clipping x0_hat does not
  change eps_hat.
  """
  if noise is None and not _is_static_zero(eta):
    raise ValueError("ddim_step with eta != 0 needs `noise` (standard normal, shaped like x_t).")
  abar = schedule.alphas_cumprod
  t_prev = jnp.asarray(t_prev)
  final = jnp.float32(1.0) if set_alpha_to_one else abar[0]
  abar_t = _per_example(abar[jnp.asarray(t)], x_t.ndim)
  abar_prev = _per_example(jnp.where(t_prev >= 0, abar[jnp.maximum(t_prev, 0)], final), x_t.ndim)

  x0, eps = schedules_lib.predict_x0_and_eps(schedule, model_output, x_t, t)
  if clip_sample:
    x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)

  variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
  sigma = eta * jnp.sqrt(variance)
  # Mathematically >= 0 for eta <= 1; the clamp only keeps float rounding from making a NaN.
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
  x_prev = jnp.sqrt(abar_prev) * x0 + direction
  if noise is not None:
    x_prev = x_prev + sigma * noise
  return x_prev.astype(x_t.dtype)


def _static_float(x):
  """x as a Python float if it is known at trace time, else None."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _is_static_zero(x) -> bool:
  return _static_float(x) == 0.0


def ddim_plan(schedule: schedules_lib.NoiseSchedule, x_T, num_steps: int, timestep_spacing: str,
              steps_offset: int, rng, *, eta=0.0, set_alpha_to_one: bool = False,
              clip_sample: bool = False, prev_timestep: str = "diffusers") -> sampler_lib.Plan:
  """The DDIM chain (see ddim_step) from x_T ~ N(0, 1); eta > 0 draws z from `rng`."""
  ts = ddim_timesteps(schedule, num_steps, timestep_spacing, steps_offset)
  prevs = ddim_prev_timesteps(schedule, ts, prev_timestep)
  stochastic = not _is_static_zero(eta)
  if stochastic and rng is None:
    raise ValueError(f"eta={eta} needs `rng`.")

  def step(x, xs, model):
    noise = jax.random.normal(xs["key"], x.shape, jnp.float32) if stochastic else None
    return ddim_step(schedule, model(x), xs["t"], xs["t_prev"], x, eta, noise,
                     set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample)

  xs = {"t": jnp.asarray(ts, jnp.int32), "t_prev": jnp.asarray(prevs, jnp.int32)}
  if stochastic:
    xs["key"] = jax.random.split(rng, len(ts))
  return sampler_lib.Plan(timesteps=ts.astype(np.float32), xs=xs, init=x_T, step=step,
                          latents=lambda x: x)


# name -> plan(schedule, x_T, num_steps, timestep_spacing, steps_offset, rng, **options); the
# keyword-only parameters of each plan are that sampler's options.
SAMPLERS = {
    "ddim": ddim_plan,
    "euler": euler.plan,
    "dpmpp_2m": dpm_solver.plan,
}

# Options every sampler honours at these values (they are no-ops), so that a caller may always pass
# them, e.g. eta=0.0 to Euler; any other value for a sampler without the option is an error.
NEUTRAL_OPTIONS = {"eta": 0.0, "clip_sample": False}


def _sampler_options(make_plan) -> tuple[str, ...]:
  params = inspect.signature(make_plan).parameters.values()
  return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _is_neutral(value, neutral) -> bool:
  """value is statically equal to the no-op value (a traced value never is)."""
  try:
    return _static_float(value) == float(neutral)
  except ValueError:   # e.g. a string
    return False


def _resolve(sampler: str, options: dict):
  """(plan function, the options it takes): rejects unknown samplers and unsupported options."""
  make_plan = SAMPLERS.get(sampler)
  if make_plan is None:
    raise ValueError(f"sampler={sampler!r} is not supported; expected one of {tuple(SAMPLERS)}.")
  supported = _sampler_options(make_plan)
  kept = {}
  for name, value in options.items():
    if name in supported:
      kept[name] = value
    elif name in NEUTRAL_OPTIONS and _is_neutral(value, NEUTRAL_OPTIONS[name]):
      continue
    else:
      raise ValueError(f"sampler={sampler!r} does not support {name}={value!r}; its options are "
                       f"{supported}.")
  return make_plan, kept


def sample(apply_fn: Callable[[Any, Any, Any], Any],
           schedule: schedules_lib.NoiseSchedule,
           x_T,
           cond,
           uncond=None,
           *,
           num_steps: int,
           guidance_scale=1.0,
           rng=None,
           sampler: str = "ddim",
           timestep_spacing: str = "leading",
           steps_offset: int = 1,
           return_trajectory: bool = False,
           **options):
  """Runs the whole chain from x_T; returns x_0 (latents, same shape and dtype as x_T).

  x_T is N(0, 1) noise for every sampler: Euler multiplies it by its init_noise_sigma itself (as
  diffusers' pipelines do with `latents * scheduler.init_noise_sigma`), so one x_T serves all.

  apply_fn(x [N, ...], t [N] float32, conditioning) -> model output (eps or v, per the schedule),
  where `cond` / `uncond` are pytrees whose leaves all have a leading batch dim B = x_T.shape[0].
  t holds the timesteps diffusers' scheduler passes to the UNet: exact integers as float32 for DDIM
  and DPM-Solver, possibly fractional for Euler with "linspace" spacing. Euler's apply_fn sees
  x / sqrt(sigma^2 + 1) (scale_model_input); the others see the latents as they are.

  sampler: "ddim" | "euler" | "dpmpp_2m" (SAMPLERS). timestep_spacing / steps_offset apply to all
  (defaults: Stable Diffusion's "leading" + 1; diffusers' Euler / DPM class default is "linspace").
  Sampler options (keyword-only parameters of its plan function):
    ddim:      eta=0.0, set_alpha_to_one=False, clip_sample=False, prev_timestep="diffusers"
    euler:     final_sigmas_type="zero" | "sigma_min"
    dpmpp_2m:  final_sigmas_type="zero" | "sigma_min", lower_order_final=True
  eta=0 and clip_sample=False are accepted by every sampler; any other option a sampler does not
  have raises ValueError naming it.

  Classifier-free guidance: out = out_u + g (out_c - out_u), with [uncond; cond] batched into one
  call of 2B. When g is a Python number equal to 1, only `cond` is evaluated (uncond may be None).
  A traced g always takes the 2B path, which is exact for any value.

  DDIM with eta > 0 draws z from `rng` (one key per step), so the result is a function of rng.
  Python-level options (num_steps, sampler, spacing, flags, apply_fn) must be static under jit.
  return_trajectory=True returns (x_0, {"timesteps": [n] float32 as apply_fn saw them,
  "latents": [n, ...] the latents after each step}) instead.
  """
  make_plan, options = _resolve(sampler, options)
  g_static = _static_float(guidance_scale)
  use_cfg = g_static != 1.0
  if use_cfg and uncond is None:
    raise ValueError(f"guidance_scale={guidance_scale} needs `uncond` conditioning.")
  plan = make_plan(schedule, x_T, num_steps, timestep_spacing, steps_offset, rng, **options)

  batch = x_T.shape[0]
  if use_cfg:
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)

  def guided_output(x, t):
    if not use_cfg:
      return apply_fn(x, jnp.full((batch,), t, jnp.float32), cond)
    out = apply_fn(jnp.concatenate([x, x], axis=0), jnp.full((2 * batch,), t, jnp.float32), both)
    out_u, out_c = out[:batch], out[batch:]
    return out_u + guidance_scale * (out_c - out_u)

  def body(carry, step):
    carry = plan.step(carry, step["xs"], lambda x: guided_output(x, step["t"]))
    return carry, (plan.latents(carry) if return_trajectory else None)

  steps = {"t": jnp.asarray(plan.timesteps, jnp.float32), "xs": plan.xs}
  carry, latents = jax.lax.scan(body, plan.init, steps)
  x_0 = plan.latents(carry)
  if return_trajectory:
    return x_0, {"timesteps": steps["t"], "latents": latents}
  return x_0

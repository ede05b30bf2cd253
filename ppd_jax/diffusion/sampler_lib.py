"""What the samplers share: the plan each one hands to `samplers.sample`, and the sigma tables.

A sampler is a function plan(schedule, x_T, num_steps, timestep_spacing, steps_offset, rng,
**options) -> Plan. `samplers.sample` runs one lax.scan over the plan's steps, calling
plan.step(carry, xs_i, model) where model(x_in) is the guided model output at step i's timestep.

Sigmas are the variance-exploding noise levels of k-diffusion / diffusers' Euler and DPM-Solver:
  sigma_t = sqrt((1 - abar_t) / abar_t),   x_VE = x_VP / sqrt(abar_t) = x_VP * sqrt(sigma^2 + 1)
They are computed in jnp from the schedule's table, so the schedule may be traced (jit argument).
"""
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from ppd_jax.diffusion import schedules as schedules_lib

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class Plan(NamedTuple):
  """One sampler's chain, ready to scan.

  timesteps: [n] float32 numpy, the timestep apply_fn sees at each step (static, host-side).
  xs:        pytree of per-step arrays with leading dim n (the scan's xs), may be {}.
  init:      the scan carry before the first step.
  step:      (carry, xs_i, model) -> carry, jittable; model(x_in) -> guided output at step i.
  latents:   carry -> the latents (what a step returns in diffusers: `prev_sample`).
  """
  timesteps: np.ndarray
  xs: Any
  init: Any
  step: Callable[[Any, Any, Callable], Any]
  latents: Callable[[Any], Any]


def check_num_steps(schedule: schedules_lib.NoiseSchedule, num_steps: int) -> int:
  n, total = int(num_steps), schedule.num_train_timesteps
  if not 1 <= n <= total:
    raise ValueError(f"num_steps={n} must be in [1, num_train_timesteps={total}].")
  return n


def bad_spacing(timestep_spacing) -> ValueError:
  return ValueError(f"timestep_spacing={timestep_spacing!r} is not supported; expected one of "
                    f"{TIMESTEP_SPACINGS}.")


def sigma_table(schedule: schedules_lib.NoiseSchedule) -> jnp.ndarray:
  """[T] float32: sigma_t = sqrt((1 - abar_t) / abar_t), ascending in t."""
  abar = schedule.alphas_cumprod.astype(jnp.float32)
  return jnp.sqrt((1.0 - abar) / abar)


def interp_sigmas(schedule: schedules_lib.NoiseSchedule, timesteps) -> jnp.ndarray:
  """sigma at (possibly fractional) timesteps, linear in t and clamped at the ends (np.interp).

    sigma(t) = sigma[lo] + (t - lo) (sigma[lo + 1] - sigma[lo]),   lo = floor(t)
  The indices and weights are host-side numpy (timesteps are static); the table may be traced.
  """
  t = np.asarray(timesteps, np.float64)
  last = schedule.num_train_timesteps - 1
  t = np.clip(t, 0, last)
  lo = np.floor(t).astype(np.int32)
  hi = np.minimum(lo + 1, last)
  w = jnp.asarray(t - lo, jnp.float32)
  table = sigma_table(schedule)
  return table[lo] + w * (table[hi] - table[lo])


def final_sigma(schedule: schedules_lib.NoiseSchedule, final_sigmas_type: str) -> jnp.ndarray:
  """Where the last step lands: 0 (x0 itself), or sigma_min = sigma at t = 0."""
  if final_sigmas_type == "zero":
    return jnp.zeros((), jnp.float32)
  if final_sigmas_type == "sigma_min":
    return sigma_table(schedule)[0]
  raise ValueError(f"final_sigmas_type={final_sigmas_type!r} is not supported; expected one of "
                   f"{FINAL_SIGMAS_TYPES}.")


def step_sigmas(schedule, timesteps, final_sigmas_type: str) -> jnp.ndarray:
  """[n + 1] float32: sigma at each visited timestep, then the final sigma."""
  return jnp.concatenate([interp_sigmas(schedule, timesteps),
                          final_sigma(schedule, final_sigmas_type)[None]])


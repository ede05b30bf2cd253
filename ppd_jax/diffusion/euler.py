"""Euler (discrete) sampling, step for step as diffusers' EulerDiscreteScheduler.

Its defaults: interpolation_type "linear", no karras / exponential / beta sigmas, s_churn = 0
(deterministic), final_sigmas_type "zero" ("sigma_min" also supported). The chain runs on
variance-exploding latents x = x_VP * sqrt(sigma^2 + 1):

  x_0      = init_noise_sigma * x_T,   x_T ~ N(0, 1)
             init_noise_sigma = max sigma (linspace, trailing) or sqrt(max sigma^2 + 1) (leading)
  x_in     = x_i / sqrt(sigma_i^2 + 1)                  (scale_model_input; what the model sees)
  x0_hat   = x_i - sigma_i eps                          (epsilon)
           = x_i / (sigma_i^2 + 1) - sigma_i / sqrt(sigma_i^2 + 1) v      (v_prediction)
  d        = (x_i - x0_hat) / sigma_i
  x_{i+1}  = x_i + (sigma_{i+1} - sigma_i) d
"""
import jax.numpy as jnp
import numpy as np

from ppd_jax.diffusion import sampler_lib
from ppd_jax.diffusion import schedules as schedules_lib


def euler_timesteps(schedule: schedules_lib.NoiseSchedule, num_steps: int,
                    timestep_spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
  """The descending timesteps (float32, length num_steps); linspace ones may be fractional.

  linspace: t_i = linspace(0, T - 1, n)             (not rounded; steps_offset ignored)
  leading:  t_i = i * (T // n) + steps_offset
  trailing: t_i = round(T - i * T / n) - 1
  """
  n, total = sampler_lib.check_num_steps(schedule, num_steps), schedule.num_train_timesteps
  if timestep_spacing == "linspace":
    ts = np.linspace(0, total - 1, n, dtype=np.float32)[::-1]
  elif timestep_spacing == "leading":
    ts = (np.arange(n) * (total // n)).round()[::-1].astype(np.float32) + steps_offset
  elif timestep_spacing == "trailing":
    ts = np.arange(total, 0, -total / n).round().astype(np.float32) - 1
  else:
    raise sampler_lib.bad_spacing(timestep_spacing)
  return ts.astype(np.float32).copy()


def init_noise_sigma(sigmas, timestep_spacing: str):
  """How much N(0, 1) noise the chain starts from (diffusers' `init_noise_sigma`)."""
  max_sigma = jnp.max(sigmas)
  if timestep_spacing in ("linspace", "trailing"):
    return max_sigma
  return jnp.sqrt(max_sigma**2 + 1.0)


def euler_step(prediction_type: str, model_output, x, sigma, sigma_next):
  """One Euler step x_i -> x_{i+1} on VE latents (module docstring); computed in float32."""
  x32 = x.astype(jnp.float32)
  out = model_output.astype(jnp.float32)
  if prediction_type == "epsilon":
    x0 = x32 - sigma * out
  else:
    x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1.0)) + x32 / (sigma**2 + 1.0)
  d = (x32 - x0) / sigma
  return (x32 + d * (sigma_next - sigma)).astype(x.dtype)


def plan(schedule: schedules_lib.NoiseSchedule, x_T, num_steps: int, timestep_spacing: str,
         steps_offset: int, rng, *, final_sigmas_type: str = "zero") -> sampler_lib.Plan:
  """The Euler chain from N(0, 1) noise x_T (scaled here by init_noise_sigma). rng is unused."""
  del rng
  ts = euler_timesteps(schedule, num_steps, timestep_spacing, steps_offset)
  sigmas = sampler_lib.step_sigmas(schedule, ts, final_sigmas_type)
  x_init = (x_T.astype(jnp.float32) * init_noise_sigma(sigmas, timestep_spacing)).astype(x_T.dtype)

  def step(x, xs, model):
    sigma, sigma_next = xs["sigma"], xs["sigma_next"]
    x_in = (x.astype(jnp.float32) / jnp.sqrt(sigma**2 + 1.0)).astype(x.dtype)
    return euler_step(schedule.prediction_type, model(x_in), x, sigma, sigma_next)

  xs = {"sigma": sigmas[:-1], "sigma_next": sigmas[1:]}
  return sampler_lib.Plan(timesteps=ts, xs=xs, init=x_init, step=step, latents=lambda x: x)

"""DPM-Solver++ (2M), step for step as diffusers' DPMSolverMultistepScheduler.

As Stable Diffusion pipelines use it: algorithm_type "dpmsolver++", solver_order 2, solver_type
"midpoint", lower_order_final True, final_sigmas_type "zero", no karras sigmas, no thresholding.
The chain runs on the usual (variance-preserving) latents, x_T ~ N(0, 1) as is. With sigma_i the
VE sigma at step i (sampler_lib) and sigma_n the final one (0, or sigma_min):

  alpha_i = 1 / sqrt(sigma_i^2 + 1),  s_i = sigma_i alpha_i,  lambda_i = log alpha_i - log s_i
  h_i     = lambda_{i+1} - lambda_i,  r_i = h_{i-1} / h_i
  D_i     = alpha_i^-1 (x_i - s_i eps)  (epsilon)  or  alpha_i x_i - s_i v  (v_prediction)
  1st:  x_{i+1} = (s_{i+1} / s_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i
  2nd:  x_{i+1} = 1st - 0.5 alpha_{i+1} (e^{-h_i} - 1) (D_i - D_{i-1}) / r_i     (midpoint)

Order per step (diffusers' rule): first order at i = 0, and at the last step when
lower_order_final and n < 15, or whenever the final sigma is 0 (then x_n = D_{n-1} exactly);
second order otherwise. The previous D rides in the scan carry.
"""
import jax.numpy as jnp
import numpy as np

from ppd_jax.diffusion import sampler_lib
from ppd_jax.diffusion import schedules as schedules_lib


def dpm_timesteps(schedule: schedules_lib.NoiseSchedule, num_steps: int,
                  timestep_spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
  """The descending integer timesteps (int64, length num_steps); note n + 1 in the grids.

  linspace: round(linspace(0, T - 1, n + 1))[::-1][:-1]
  leading:  (i * (T // (n + 1)))[::-1][:-1] + steps_offset,  i = 0..n
  trailing: round(T - i * T / n) - 1                            (same as DDIM / Euler)
  """
  n, total = sampler_lib.check_num_steps(schedule, num_steps), schedule.num_train_timesteps
  if timestep_spacing == "linspace":
    ts = np.linspace(0, total - 1, n + 1).round()[::-1][:-1].astype(np.int64)
  elif timestep_spacing == "leading":
    ts = (np.arange(n + 1) * (total // (n + 1))).round()[::-1][:-1].astype(np.int64)
    ts = ts + steps_offset
  elif timestep_spacing == "trailing":
    ts = np.arange(total, 0, -total / n).round().astype(np.int64) - 1
  else:
    raise sampler_lib.bad_spacing(timestep_spacing)
  return ts.copy()


def second_order_steps(num_steps: int, final_sigmas_type: str, lower_order_final: bool):
  """[n] bool, host-side: which steps use the 2nd-order multistep update (module docstring)."""
  second = np.ones(num_steps, bool)
  second[0] = False
  if final_sigmas_type == "zero" or (lower_order_final and num_steps < 15):
    second[-1] = False
  return second


def coefficients(sigmas, second):
  """Per-step coefficients (each [n]) so that x_{i+1} = a x_i + b D_i + c (D_i - D_{i-1}).

    a = s_{i+1} / s_i,  b = -alpha_{i+1} (e^{-h_i} - 1),  c = 0.5 b / r_i (0 on 1st-order steps)
  With sigma_n = 0: s_n = 0, lambda_n = inf, e^{-h} = 0, so a = 0, b = 1 and the step lands on D.
  """
  alpha = 1.0 / jnp.sqrt(sigmas**2 + 1.0)
  s = sigmas * alpha
  lam = jnp.log(alpha) - jnp.log(s)
  h = lam[1:] - lam[:-1]
  a = s[1:] / s[:-1]
  b = -alpha[1:] * (jnp.exp(-h) - 1.0)
  h_prev = jnp.concatenate([h[:1], h[:-1]])
  safe_r = jnp.where(second, h_prev / jnp.where(second, h, 1.0), 1.0)
  c = jnp.where(second, 0.5 * b / safe_r, 0.0)
  return {"alpha": alpha[:-1], "s": s[:-1], "a": a, "b": b, "c": c}


def data_prediction(prediction_type: str, model_output, x, alpha, s):
  """D = x0_hat from eps (D = (x - s eps) / alpha) or v (D = alpha x - s v); float32."""
  out = model_output.astype(jnp.float32)
  if prediction_type == "epsilon":
    return (x - s * out) / alpha
  return alpha * x - s * out


def plan(schedule: schedules_lib.NoiseSchedule, x_T, num_steps: int, timestep_spacing: str,
         steps_offset: int, rng, *, final_sigmas_type: str = "zero",
         lower_order_final: bool = True) -> sampler_lib.Plan:
  """The DPM-Solver++ 2M chain from x_T ~ N(0, 1) (init_noise_sigma is 1). rng is unused.

  Carry: (x_i, D_{i-1}); D_{-1} is never used (c_0 = 0) and starts as zeros.
  """
  del rng
  ts = dpm_timesteps(schedule, num_steps, timestep_spacing, steps_offset)
  sigmas = sampler_lib.step_sigmas(schedule, ts, final_sigmas_type)
  second = second_order_steps(len(ts), final_sigmas_type, bool(lower_order_final))
  coef = coefficients(sigmas, jnp.asarray(second))

  def step(carry, k, model):
    x, d_prev = carry
    x32 = x.astype(jnp.float32)
    d = data_prediction(schedule.prediction_type, model(x), x32, k["alpha"], k["s"])
    x_next = k["a"] * x32 + k["b"] * d + k["c"] * (d - d_prev)
    return x_next.astype(x.dtype), d

  init = (x_T, jnp.zeros(x_T.shape, jnp.float32))
  return sampler_lib.Plan(timesteps=ts.astype(np.float32), xs=coef, init=init, step=step,
                          latents=lambda carry: carry[0])

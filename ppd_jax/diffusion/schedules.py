"""Discrete DDPM noise schedules and the forward process they define.

Conventions follow diffusers' DDPMScheduler / DDIMScheduler, so that weights trained there (SD 1.x,
2.x, SDXL) see the same noise levels here:

  betas_t           t = 0 .. T-1, float32
  abar_t            = prod_{s<=t} (1 - beta_s)                         (alphas_cumprod)
  x_t               = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps           (add_noise)
  v                 = sqrt(abar_t) eps - sqrt(1 - abar_t) x0           (velocity)
  SNR(t)            = abar_t / (1 - abar_t)

The tables are built once in numpy: betas in float32 as diffusers stores them, the cumprod in
float64, then rounded to float32 (diffusers' float32 cumprod differs from it by a few ulp, < 1e-6).
Everything that takes a timestep is jittable.
"""
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@flax.struct.dataclass
class NoiseSchedule:
  """The per-timestep tables; a pytree, so it can be passed into jitted functions as an argument.

  `num_train_timesteps` and `prediction_type` are static (part of the tree structure), so code may
  branch on them at trace time.
  """
  betas: jnp.ndarray            # [T] float32
  alphas_cumprod: jnp.ndarray   # [T] float32, abar_t
  num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
  prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")

  # The training-side interface the step uses for every schedule (CascadeSchedule has the same).
  def draw_t(self, key, batch_size: int):
    """[B] int32 training timesteps, uniform over 0 .. T-1."""
    return jax.random.randint(key, (batch_size,), 0, self.num_train_timesteps)

  def diffuse(self, x0, noise, t):
    """(x_t, what the network is conditioned on (t itself), target, 1 - abar_t [B])."""
    weight = 1.0 - self.alphas_cumprod[jnp.asarray(t)]
    return add_noise(self, x0, noise, t), t, training_target(self, x0, noise, t), weight


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule: beta_i = min(1 - abar(t_{i+1}) / abar(t_i), 0.999).

  abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), s = i / T. Computed in float64 like diffusers'
  betas_for_alpha_bar, then cast to float32.
  """
  def abar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

  n = num_train_timesteps
  betas = [min(1.0 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
  return np.asarray(betas, dtype=np.float32)


def _betas(num_train_timesteps, beta_schedule, beta_start, beta_end) -> np.ndarray:
  n = num_train_timesteps
  if beta_schedule == "linear":
    # beta_t = linspace(beta_start, beta_end)
    return np.linspace(beta_start, beta_end, n, dtype=np.float32)
  if beta_schedule == "scaled_linear":
    # beta_t = linspace(sqrt(beta_start), sqrt(beta_end))^2  (latent diffusion / Stable Diffusion)
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float32) ** 2
  if beta_schedule == "squaredcos_cap_v2":
    return _cosine_betas(n)
  raise ValueError(
      f"diffusion.beta_schedule={beta_schedule!r} is not supported; expected one of "
      f"{BETA_SCHEDULES}.")


def make_schedule(num_train_timesteps: int = 1000,
                  beta_schedule: str = "scaled_linear",
                  beta_start: float = 0.00085,
                  beta_end: float = 0.012,
                  prediction_type: str = "epsilon") -> NoiseSchedule:
  """Builds the schedule; defaults are Stable Diffusion 1.x/2.x's."""
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(
        f"diffusion.prediction_type={prediction_type!r} is not supported; expected one of "
        f"{PREDICTION_TYPES}.")
  betas = _betas(int(num_train_timesteps), beta_schedule, beta_start, beta_end)
  alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float32)
  return NoiseSchedule(
      betas=jnp.asarray(betas),
      alphas_cumprod=jnp.asarray(alphas_cumprod),
      num_train_timesteps=int(num_train_timesteps),
      prediction_type=prediction_type)


def schedule_from_config(diffusion_cfg):
  """`config.diffusion` (see configs/common.py) -> the run's schedule: a NoiseSchedule (integer
  t, SD) or, with process = "cascade", cascade_schedule.CascadeSchedule (continuous t)."""
  if diffusion_cfg.get("process", "ddpm") == "cascade":
    from ppd_jax.diffusion import cascade_schedule
    return cascade_schedule.CascadeSchedule(s=float(diffusion_cfg.get("cosine_s", 0.008)))
  return make_schedule(
      num_train_timesteps=diffusion_cfg.num_train_timesteps,
      beta_schedule=diffusion_cfg.beta_schedule,
      beta_start=diffusion_cfg.beta_start,
      beta_end=diffusion_cfg.beta_end,
      prediction_type=diffusion_cfg.prediction_type)


def _gather(table: jnp.ndarray, t, ndim: int) -> jnp.ndarray:
  """table[t] shaped to broadcast against an array of rank `ndim` whose leading dims are t's."""
  values = table[jnp.asarray(t)]
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _coefficients(schedule: NoiseSchedule, t, ndim: int):
  """(sqrt(abar_t), sqrt(1 - abar_t)), broadcastable over an array of rank `ndim`."""
  abar = _gather(schedule.alphas_cumprod, t, ndim)
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def add_noise(schedule: NoiseSchedule, x0, noise, t):
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; t is [B] (or a scalar), x0 any rank >= 1."""
  a, s = _coefficients(schedule, t, x0.ndim)
  return (a * x0 + s * noise).astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0, noise, t):
  """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho, 2022)."""
  a, s = _coefficients(schedule, t, x0.ndim)
  return (a * noise - s * x0).astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0, noise, t):
  """What the network is regressed onto: eps, or v for v_prediction models (SD 2.x 768)."""
  if schedule.prediction_type == "epsilon":
    return noise
  return velocity(schedule, x0, noise, t)


def snr(schedule: NoiseSchedule, t):
  """SNR(t) = abar_t / (1 - abar_t)."""
  abar = schedule.alphas_cumprod[jnp.asarray(t)]
  return abar / (1.0 - abar)


def predict_x0_and_eps(schedule: NoiseSchedule, model_output, x_t, t):
  """Model output (eps or v, per the schedule) -> (x0_hat, eps_hat).

  epsilon:  x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
  v:        x0 = sqrt(abar) x_t - sqrt(1 - abar) v,   eps = sqrt(abar) v + sqrt(1 - abar) x_t
  """
  a, s = _coefficients(schedule, t, x_t.ndim)
  model_output = model_output.astype(jnp.promote_types(model_output.dtype, jnp.float32))
  if schedule.prediction_type == "epsilon":
    eps = model_output
    x0 = (x_t - s * eps) / a
  else:
    x0 = a * x_t - s * model_output
    eps = a * model_output + s * x_t
  return x0, eps

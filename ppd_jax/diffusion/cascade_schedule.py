"""Stable Cascade's (Wuerstchen v3) continuous-time noise schedule and its training-side functions.

Stable Cascade has no integer timesteps: t is continuous in [0, 1] (1 = pure noise), and the
same schedule is used by its own code (gdf: CosineSchedule, VPScaler, CosineTNoiseCond,
P2LossWeight) and by diffusers' DDPMWuerstchenScheduler:

  abar(t)   = clamp(cos^2(theta(t)) / cos^2(theta(0)), 1e-4, 0.9999)
  theta(t)  = (t + s) / (1 + s) pi/2
  x_t       = sqrt(abar) x0 + sqrt(1 - abar) eps                     (the target is eps)
  r         = noise_cond(abar) = clamp(acos(sqrt(abar cos^2(theta(0)))) / (pi/2) (1 + s) - s, 0, 1)
  w_p2      = 1 / (1 + SNR) = 1 - abar                               (P2LossWeight(k=1, gamma=1))
  t (train) = clamp(1 - U[0, 1) + 0.001, 0.001, 1)                   (CosineSchedule's own draw)

with s = 0.008. noise_cond inverts the clamped abar, so r = t except at the clamped ends:
t >= 0.99358 gives r = 0.99358 and t <= 0.00226 gives r = 0.00226. The model sees r, which is
what Stable Cascade trained on; diffusers' sampler feeds it t itself (cascade_sampler.py).

Everything here is float32 whatever the model's dtype: in bf16 r * 1e4 (the timestep embedding)
loses most of its sine components, and 1 - abar near 0.9999 loses all precision.
Everything that takes t or abar is jittable.
"""
import math

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class CascadeSchedule:
  """The schedule's constants; all static, so it is an empty pytree that jit can take or close
  over, and code can dispatch on its type (NoiseSchedule is the integer-t SD one)."""
  s: float = flax.struct.field(pytree_node=False, default=0.008)
  abar_min: float = flax.struct.field(pytree_node=False, default=1e-4)
  abar_max: float = flax.struct.field(pytree_node=False, default=0.9999)
  t_min: float = flax.struct.field(pytree_node=False, default=0.001)   # the training draw's floor

  @property
  def theta0(self) -> float:
    """theta(0) = s / (1 + s) pi / 2; abar's normaliser is cos^2(theta0)."""
    return self.s / (1.0 + self.s) * math.pi / 2

  # The training-side interface the step uses for every schedule (schedules.NoiseSchedule's).
  def draw_t(self, key, batch_size: int):
    return draw_t(self, key, batch_size)

  def diffuse(self, x0, noise, t):
    return diffuse(self, x0, noise, t)


def from_diffusers_config(config: dict) -> CascadeSchedule:
  """A hub scheduler_config.json (DDPMWuerstchenScheduler) -> CascadeSchedule.

  Only scaler = 1 is supported: it is what the Stable Cascade checkpoints ship, and any other
  value warps t in the sampler only, which gdf (the training code) never did."""
  name = config.get("_class_name", "DDPMWuerstchenScheduler")
  if name != "DDPMWuerstchenScheduler":
    raise ValueError(f"scheduler _class_name={name!r}: expected 'DDPMWuerstchenScheduler'.")
  scaler = float(config.get("scaler", 1.0))
  if scaler != 1.0:
    raise ValueError(f"scheduler scaler={scaler}: only 1.0 is supported (Stable Cascade's).")
  return CascadeSchedule(s=float(config.get("s", 0.008)))


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _per_example(values: jax.Array, ndim: int) -> jax.Array:
  """[B] (or scalar) -> broadcastable against a rank-`ndim` array whose leading dims are B's."""
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def alphas_cumprod(schedule: CascadeSchedule, t) -> jax.Array:
  """abar(t), float32, same shape as t (module docstring).

  cos(theta(t)) is computed as sin((1 - t)/(1 + s) pi/2), the same number, because near t = 1
  float32 cos of an angle near pi/2 has a large relative error (1 - t is exact there)."""
  t = _f32(t)
  s = schedule.s
  cos_t = jnp.sin((1.0 - t) / (1.0 + s) * (math.pi / 2))
  abar = jnp.square(cos_t) / math.cos(schedule.theta0) ** 2
  return jnp.clip(abar, schedule.abar_min, schedule.abar_max)


def log_snr(schedule: CascadeSchedule, t) -> jax.Array:
  """log SNR = log(abar / (1 - abar)), in [-9.21, 9.21]: gdf's internal noise coordinate."""
  abar = alphas_cumprod(schedule, t)
  return jnp.log(abar) - jnp.log1p(-abar)


def noise_cond(schedule: CascadeSchedule, abar) -> jax.Array:
  """r = CosineTNoiseCond: the t whose unclamped abar is `abar`, clamped to [0, 1]; float32.

    r = acos(sqrt(abar c0)) / (pi/2) (1 + s) - s,   c0 = cos^2(theta0)
  acos(sqrt(y)) is evaluated as atan2(sqrt(1 - y), sqrt(y)) with 1 - y = (1 - abar) + abar sin^2
  (theta0): near abar = 0.9999 acos of a number near 1 would lose 3 digits in float32."""
  abar = jnp.clip(_f32(abar), 0.0, 1.0)
  c0 = math.cos(schedule.theta0) ** 2
  s0 = math.sin(schedule.theta0) ** 2
  angle = jnp.arctan2(jnp.sqrt((1.0 - abar) + abar * s0), jnp.sqrt(abar * c0))
  r = angle / (math.pi / 2) * (1.0 + schedule.s) - schedule.s
  return jnp.clip(r, 0.0, 1.0)


def model_r(schedule: CascadeSchedule, t) -> jax.Array:
  """What the network is conditioned on at training time t: noise_cond(abar(t))."""
  return noise_cond(schedule, alphas_cumprod(schedule, t))


def coefficients(schedule: CascadeSchedule, t, ndim: int):
  """(sqrt(abar_t), sqrt(1 - abar_t)), float32, broadcastable over a rank-`ndim` array."""
  abar = _per_example(alphas_cumprod(schedule, t), ndim)
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def add_noise(schedule: CascadeSchedule, x0, noise, t) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; t [B] (or scalar); the result is at least
  float32 (cast to the model's dtype at the model's boundary, not here)."""
  a, b = coefficients(schedule, t, jnp.ndim(x0))
  return a * _f32(x0) + b * _f32(noise)


def training_target(schedule: CascadeSchedule, x0, noise, t) -> jax.Array:
  """Stable Cascade regresses onto eps (gdf EpsilonTarget) at every t."""
  del schedule, x0, t
  return _f32(noise)


def predict_x0(schedule: CascadeSchedule, eps, x_t, t) -> jax.Array:
  """x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar), float32 (previews, diagnostics)."""
  a, b = coefficients(schedule, t, jnp.ndim(x_t))
  return (_f32(x_t) - b * _f32(eps)) / a


def p2_loss_weight(schedule: CascadeSchedule, t) -> jax.Array:
  """Stable Cascade's loss weight (1 + SNR)^-1 = 1 - abar(t): 1e-4 at t ~ 0, 1 at t ~ 1."""
  return 1.0 - alphas_cumprod(schedule, t)


def diffuse(schedule: CascadeSchedule, x0, noise, t):
  """gdf.diffuse for one t per row: (x_t, r, target, p2 weight), all float32.

  x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; r = noise_cond(abar) [B]; target = eps;
  weight = 1 - abar [B] (Stable Cascade's own loss weight; Diffusion-DPO uses none)."""
  abar = alphas_cumprod(schedule, t)
  a, b = coefficients(schedule, t, jnp.ndim(x0))
  x_t = a * _f32(x0) + b * _f32(noise)
  return x_t, noise_cond(schedule, abar), training_target(schedule, x0, noise, t), 1.0 - abar


def draw_t(schedule: CascadeSchedule, key: jax.Array, batch_size: int) -> jax.Array:
  """[B] float32 training t, as train_c.py's gdf.diffuse draws it (one per pair in DPO):

    t = clamp(1 - U[0, 1) + t_min, t_min, 1)
  so t is in (t_min, 1] (1 - U is in (0, 1]; the lower clamp only guards rounding) and
  P(t = 1) = t_min: 0.1% of draws are the clamped pure-noise end."""
  u = jax.random.uniform(key, (batch_size,), jnp.float32)
  return jnp.clip(1.0 - u + schedule.t_min, schedule.t_min, 1.0)


def draw_t_and_noise(schedule: CascadeSchedule, key: jax.Array, shape) -> tuple:
  """(t [B], eps [B, ...] ~ N(0, 1)) from one key, both float32; shape is x0's [B, ...]."""
  key_t, key_eps = jax.random.split(key)
  return draw_t(schedule, key_t, shape[0]), jax.random.normal(key_eps, tuple(shape), jnp.float32)

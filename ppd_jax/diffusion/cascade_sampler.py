"""Stable Cascade sampling: DDPMWuerstchenScheduler's ancestral step and its jitted CFG loop.

Conventions follow diffusers' StableCascadePriorPipeline / StableCascadeDecoderPipeline with
DDPMWuerstchenScheduler (scaler = 1), so that from the same x_T and per-step noise the latents
here and there agree step for step:

  * grid: t_i = linspace(1, 0, N + 1) in float32 (torch's rounding); the loop visits t_0 .. t_{N-1}
    and step i lands on t_{i+1}, the last one on t = 0, where abar is clamped to 0.9999;
  * the model is called with r = t_i for the whole batch ("t", diffusers: r = 1.0 at the first
    step), or with gdf's r = noise_cond(abar(t_i)) ("noise_cond", what Stable Cascade's own
    sampler and training use: 0.99358 at the first step);
  * step (x_t -> x_prev, alpha = abar_t / abar_prev):
      mu     = (x_t - (1 - alpha) / sqrt(1 - abar_t) eps) / sqrt(alpha)
      x_prev = mu + sqrt((1 - alpha)(1 - abar_prev) / (1 - abar_t)) z,   no z when t_prev == 0
    (the DDPM posterior; equal to gdf's DDPMSampler, DDIM with eta = 1);
  * CFG only when guidance_scale > 1 (both pipelines' do_classifier_free_guidance); the model is
    called once on the 2B batch [cond; uncond] (the reverse of SD's order) and
      eps = lerp(eps_u, eps_c, w) = eps_u + w (eps_c - eps_u)
    The prior's default is 20 steps, w = 4; the decoder's 10 steps, w = 0 (no CFG).

The arithmetic is float32 whatever the latents' dtype; the carry keeps x_T's dtype (the
pipelines carry the model's dtype). In bf16 the pipelines also round t to bf16, both for the
model and for abar_t in the step (prev_t stays float32); timestep_dtype=jnp.bfloat16 reproduces
that, the default keeps t in float32.
"""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ppd_jax.diffusion import cascade_schedule as cs

MODEL_R = ("t", "noise_cond")


def timesteps(num_steps: int) -> np.ndarray:
  """[N + 1] float32 host-side grid linspace(1, 0, N + 1), rounded as torch.linspace rounds it
  (float32 step, each point rounded once, the first half from 1, the second half from 0), so
  the t the model sees equal diffusers' bit for bit (numpy's linspace differs by an ulp)."""
  n = int(num_steps)
  if n < 1:
    raise ValueError(f"num_steps={n} must be >= 1.")
  step = np.float64(np.float32(-1.0) / np.float32(n))
  i = np.arange(n + 1, dtype=np.float64)
  grid = np.where(i < (n + 1) // 2, 1.0 + step * i, 0.0 - step * (n - i))
  return grid.astype(np.float32)


def guidance_enabled(guidance_scale) -> bool:
  """The pipelines' rule: CFG iff guidance_scale > 1 (so w = 0.5 means cond only, not a lerp)."""
  try:
    return float(guidance_scale) > 1.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError("guidance_scale is traced, so whether to run CFG (w > 1) cannot be decided; "
                     "pass cfg=True or cfg=False.") from None


def _per_example(values, ndim: int):
  values = jnp.asarray(values)
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def step(schedule: cs.CascadeSchedule, eps, t, t_prev, x, noise):
  """One DDPMWuerstchenScheduler step x_t -> x_{t_prev} (module docstring), float32 arithmetic,
  returned in x's dtype. t, t_prev: scalars or [B]; noise: z ~ N(0, 1) shaped like x, ignored
  where t_prev == 0 (the last step lands on the mean)."""
  ndim = x.ndim
  abar_t = _per_example(cs.alphas_cumprod(schedule, t), ndim)
  abar_prev = _per_example(cs.alphas_cumprod(schedule, t_prev), ndim)
  alpha = abar_t / abar_prev
  x32, eps32 = x.astype(jnp.float32), eps.astype(jnp.float32)
  # mu = (x - (1 - alpha) eps / sqrt(1 - abar_t)) / sqrt(alpha)
  mu = (x32 - (1.0 - alpha) / jnp.sqrt(1.0 - abar_t) * eps32) / jnp.sqrt(alpha)
  # sigma = sqrt((1 - alpha)(1 - abar_prev) / (1 - abar_t)); no noise on the step to t = 0.
  sigma = jnp.sqrt((1.0 - alpha) * (1.0 - abar_prev) / (1.0 - abar_t))
  last = _per_example(jnp.asarray(t_prev) == 0, ndim)
  x_prev = mu + jnp.where(last, 0.0, sigma * noise.astype(jnp.float32))
  return x_prev.astype(x.dtype)


def guided_eps(eps_fn: Callable, x, r, both, guidance_scale):
  """eps_fn on [x; x] with r [2B] and the [cond; uncond] conditioning `both` (leaves [2B, ...]),
  then eps = eps_u + w (eps_c - eps_u) (torch.lerp(eps_u, eps_c, w)); float32."""
  b = x.shape[0]
  out = eps_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([r, r], axis=0), both)
  out = out.astype(jnp.float32)
  eps_c, eps_u = out[:b], out[b:]
  return eps_u + guidance_scale * (eps_c - eps_u)


def cfg_batch(cond, uncond):
  """The [cond; uncond] conditioning pytree (leaves concatenated on the batch axis)."""
  if uncond is None:
    raise ValueError("CFG (guidance_scale > 1) needs `uncond` conditioning.")
  return jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)


@functools.partial(jax.jit, static_argnames=(
    "eps_fn", "num_steps", "cfg", "schedule", "model_r", "timestep_dtype", "return_trajectory"))
def _sample(eps_fn, x_T, key, guidance_scale, cond, uncond, noise, *, num_steps, cfg, schedule,
            model_r, timestep_dtype, return_trajectory):
  grid = timesteps(num_steps)
  both = cfg_batch(cond, uncond) if cfg else cond
  batch = x_T.shape[0]
  if noise is None:
    keys = jax.random.split(key, num_steps)
    draw = lambda xs: jax.random.normal(xs["key"], x_T.shape, jnp.float32)
    xs = {"key": keys}
  else:
    draw = lambda xs: xs["noise"]
    xs = {"noise": jnp.asarray(noise, jnp.float32)}
  xs.update(t=jnp.asarray(grid[:-1]), t_prev=jnp.asarray(grid[1:]))

  def body(x, xs):
    t = xs["t"]
    if timestep_dtype is not None:   # the pipelines' t.to(dtype), used for model and step alike
      t = t.astype(timestep_dtype).astype(jnp.float32)
    r = t if model_r == "t" else cs.model_r(schedule, t)
    r = jnp.full((batch,), r, jnp.float32 if timestep_dtype is None else timestep_dtype)
    if cfg:
      eps = guided_eps(eps_fn, x, r, both, guidance_scale)
    else:
      eps = eps_fn(x, r, both)
    x = step(schedule, eps, t, xs["t_prev"], x, draw(xs))
    return x, ((r, x) if return_trajectory else None)

  x_0, traj = jax.lax.scan(body, x_T, xs)
  if return_trajectory:
    return x_0, {"t": xs["t"], "r": traj[0], "latents": traj[1]}
  return x_0


def sample(eps_fn: Callable[[Any, Any, Any], Any],
           x_T,
           key,
           num_steps: int,
           guidance_scale=0.0,
           cond=None,
           uncond=None,
           *,
           cfg: bool | None = None,
           noise=None,
           schedule: cs.CascadeSchedule = cs.CascadeSchedule(),
           model_r: str = "t",
           timestep_dtype=None,
           return_trajectory: bool = False):
  """Runs the whole DDPM-Wuerstchen chain from x_T ~ N(0, 1) (one compiled lax.scan); returns
  the final latents (x_T's shape and dtype).

  eps_fn(x [M, ...], r [M] float32, c) -> eps [M, ...]: c is `cond` (M = B) without CFG, or
  the [cond; uncond] concatenation of the two pytrees (M = 2B, leaves with a leading batch dim)
  with CFG, so a model wrapper gets each half's conditioning (the decoder's uncond effnet is
  zeros, the prior's is the empty caption). eps_fn is a static argument: keep the same function
  across calls (params and conditioning go in through cond / uncond, or through a closure when
  the caller is itself jitted) or every call recompiles.

  guidance_scale: w; CFG runs iff w > 1 (the pipelines' rule), decided from a Python number; a
  traced w (inside the caller's jit) needs cfg=True / False. cfg=True with a traced w is the lerp
  for any value, and w is a traced argument here, so changing it does not recompile.
  key: one jax.random key; step i's z is normal(split(key, N)[i]). noise [N, *x_T.shape]
  instead injects z (tests; step N - 1's z is unused). model_r: "t" (diffusers) or "noise_cond"
  (gdf). timestep_dtype: None (float32 t) or e.g. jnp.bfloat16 to round t as the bf16 pipelines do.
  return_trajectory=True returns (x_0, {"t": [N] the grid points visited, "r": [N, B] the r of
  each step (eps_fn got [r; r] with CFG), "latents": [N, ...] after each step}).
  """
  if model_r not in MODEL_R:
    raise ValueError(f"model_r={model_r!r} is not supported; expected one of {MODEL_R}.")
  if cfg is None:
    cfg = guidance_enabled(guidance_scale)
  num_steps = int(num_steps)
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1.")
  if noise is None and key is None:
    raise ValueError("sample needs `key` (or injected `noise`).")
  if noise is not None and tuple(np.shape(noise)) != (num_steps,) + tuple(x_T.shape):
    raise ValueError(f"noise has shape {np.shape(noise)}; expected {(num_steps,) + x_T.shape}.")
  if cfg and uncond is None:
    raise ValueError(f"guidance_scale={guidance_scale} (CFG) needs `uncond` conditioning.")
  timestep_dtype = None if timestep_dtype is None else jnp.dtype(timestep_dtype)
  return _sample(eps_fn, x_T, key, jnp.asarray(guidance_scale, jnp.float32), cond,
                 uncond if cfg else None, noise, num_steps=num_steps, cfg=bool(cfg),
                 schedule=schedule, model_r=model_r, timestep_dtype=timestep_dtype,
                 return_trajectory=bool(return_trajectory))

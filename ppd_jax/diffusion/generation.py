"""Batched text(+user)-to-image generation: the jitted DDIM chain over fixed-size chunks.

Classifier-free guidance pairs the conditional branch (caption + user tokens at `user_scale`) with
an unconditional one (empty caption, user branch off):
    out = out(empty, no user) + g * (out(caption, user) - out(empty, no user)).
With `user` None the user branch is not built at all: the frozen base model.

Inputs are split into chunks of `batch_size` (the last one padded), so one compiled program serves
any number of images; image i depends only on its own noise, caption and user, never on the
chunking (for eta = 0).
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppd_jax.diffusion import samplers


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "eta", "clip_sample"))
def _generate(model, schedule, params, noise, text, null_text, user, user_scale, guidance_scale,
              rng, *, num_steps, eta, clip_sample):
  def apply(x, t, cond):
    return model.apply({"params": params}, x, t, cond["text"], cond["user"], cond["scale"])

  b = noise.shape[0]
  cond = {"text": text, "user": user, "scale": jnp.broadcast_to(user_scale, (b,))}
  uncond = {"text": null_text, "user": user, "scale": jnp.zeros((b,), jnp.float32)}
  return samplers.sample(apply, schedule, noise, cond, uncond, num_steps=num_steps,
                         guidance_scale=guidance_scale, rng=rng, eta=eta,
                         timestep_spacing="trailing", steps_offset=0, clip_sample=clip_sample)


def initial_noise(seed: int, n: int, model_cfg) -> np.ndarray:
  """x_T [n, H, W, C] float32 where image i's noise depends on (seed, i) only, not on n."""
  shape = (model_cfg.sample_size, model_cfg.sample_size, model_cfg.in_channels)
  key = jax.random.key(seed)
  draw = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))
  return np.asarray(draw(jnp.arange(n)))


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x


def sample_images(model, schedule, params, text: np.ndarray, null_text: np.ndarray,
                  noise: np.ndarray, user: np.ndarray | None = None, *, user_scale: float = 1.0,
                  guidance_scale: float, num_steps: int, eta: float = 0.0,
                  clip_sample: bool = False, seed: int = 0, batch_size: int = 64,
                  progress=None) -> np.ndarray:
  """Images [N, H, W, C] in [-1, 1].

  text [N, L, D] (caption embeddings), null_text [1 or N, L, D] (the empty caption's), noise
  [N, H, W, C] (x_T), user [N, T, E] user embeddings or None for the base model. clip_sample
  clips each step's x0 prediction to [-1, 1]: pixel-space models need it, since at the first
  trailing timestep (abar ~ 0) x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) amplifies any error in
  eps. progress, if given, is called with a one-line status after each chunk.
  """
  n = len(noise)
  null_text = np.broadcast_to(null_text, text.shape)
  out, start = [], time.perf_counter()
  for first in range(0, n, batch_size):
    rows = slice(first, min(first + batch_size, n))
    size = min(batch_size, 1 << (n - 1).bit_length())   # few distinct shapes: few compiles
    chunk = [_pad(np.asarray(a[rows], np.float32), size) for a in (noise, text, null_text)]
    u = None if user is None else _pad(np.asarray(user[rows], np.float32), size)
    x0 = _generate(model, schedule, params, chunk[0], chunk[1], chunk[2], u,
                   jnp.float32(user_scale), jnp.float32(guidance_scale),
                   jax.random.fold_in(jax.random.key(seed), first),
                   num_steps=int(num_steps), eta=float(eta), clip_sample=bool(clip_sample))
    out.append(np.asarray(jnp.clip(x0, -1.0, 1.0))[:rows.stop - rows.start])
    if progress is not None:
      rate = rows.stop / (time.perf_counter() - start)
      progress(f"  sampled {rows.stop}/{n} images  {rate:.1f} images/s  "
               f"ETA {(n - rows.stop) / rate:.0f}s")
  return np.concatenate(out)

"""Batched text(+user)-to-image generation: the jitted DDIM chain over fixed-size chunks.

Classifier-free guidance pairs the conditional branch (caption + user tokens at `user_scale`) with
an unconditional one (empty caption, user branch off):
    out = out(empty, no user) + g * (out(caption, user) - out(empty, no user)).
With `user` None the user branch is not built at all: the frozen base model.

Inputs are split into chunks of `batch_size` (the last one padded), so one compiled program serves
any number of images; image i depends only on its own noise, caption and user, never on the
chunking (for eta = 0).

Progress: inside `step_listener(fn)` each denoiser evaluation of the compiled loop calls
fn() on the host (diffusion/progress.py); outside it the loop has no callback at all.
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppd_jax import backbones
from ppd_jax.diffusion import cascade_sampler
from ppd_jax.diffusion import progress as progress_lib
from ppd_jax.diffusion import samplers


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "eta", "clip_sample",
                                             "sampler", "cfg", "report"))
def _generate(model, schedule, params, noise, text, null_text, user, user_scale, guidance_scale,
              rng, *, num_steps, eta, clip_sample, sampler, cfg, report=False):
  def apply(x, t, cond):
    if report:
      progress_lib.report_step()
    context, added = backbones.unet_conditioning(cond["text"])
    return model.apply({"params": params}, x, t, context, cond["user"], cond["scale"], added)

  b = noise.shape[0]
  cond = {"text": text, "user": user, "scale": jnp.broadcast_to(user_scale, (b,))}
  uncond = {"text": null_text, "user": user, "scale": jnp.zeros((b,), jnp.float32)}
  if sampler == "ddpm_wuerstchen":   # Stable Cascade's continuous-t chain, [cond; uncond] CFG
    return cascade_sampler.sample(apply, noise, rng, num_steps, guidance_scale, cond, uncond,
                                  cfg=cfg, schedule=schedule)
  options = {"eta": eta, "clip_sample": clip_sample} if sampler == "ddim" else {}
  return samplers.sample(apply, schedule, noise, cond, uncond, num_steps=num_steps,
                         guidance_scale=guidance_scale, rng=rng, sampler=sampler,
                         timestep_spacing="trailing", steps_offset=0, **options)


def initial_noise(seed: int, n: int, model_cfg) -> np.ndarray:
  """x_T [n, H, W, C] float32 where image i's noise depends on (seed, i) only, not on n."""
  shape = (model_cfg.sample_size, model_cfg.sample_size, model_cfg.in_channels)
  key = jax.random.key(seed)
  draw = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))
  return np.asarray(draw(jnp.arange(n)))


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x


def _as_text_dict(text) -> dict:
  return dict(text) if isinstance(text, dict) else {"text_embedding": text}


def sample_images(model, schedule, params, text, null_text, noise: np.ndarray,
                  user: np.ndarray | None = None, *, user_scale: float = 1.0,
                  guidance_scale: float, num_steps: int, eta: float = 0.0,
                  clip_sample: bool = False, sampler: str = "ddim", seed: int = 0,
                  batch_size: int = 64, decode=None, progress=None) -> np.ndarray:
  """Images [N, H, W, C] in [-1, 1].

  text: caption conditioning, [N, L, D] or a dict of [N, ...] arrays (backbones/: SDXL adds
  pooled text and time_ids); null_text: the empty caption's, with a leading dim of 1 or N. noise
  [N, H, W, C] (x_T), user [N, T, E] user embeddings or None for the base model. clip_sample
  (DDIM) clips each step's x0 prediction to [-1, 1]: pixel-space models need it, since at the
  first trailing timestep (abar ~ 0) x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) amplifies any
  error in eps. decode(latents, text=, seed=) maps each chunk's final latents to images (the
  backbone's to_images: a VAE decoder, Stable Cascade's Stage B + A; None: pixel space).
  sampler "ddpm_wuerstchen" is Stable Cascade's (cascade_sampler.py; CFG iff guidance_scale > 1).
  progress, if given, is called with a one-line status after each chunk.
  """
  n = len(noise)
  text = _as_text_dict(text)
  null_text = {k: np.broadcast_to(v, text[k].shape) for k, v in _as_text_dict(null_text).items()}
  out, start = [], time.perf_counter()
  for first in range(0, n, batch_size):
    rows = slice(first, min(first + batch_size, n))
    size = min(batch_size, 1 << (n - 1).bit_length())   # few distinct shapes: few compiles
    chunk = lambda a: _pad(np.asarray(a[rows], np.float32), size)
    u = None if user is None else chunk(user)
    x0 = _generate(model, schedule, params, chunk(noise), jax.tree.map(chunk, text),
                   jax.tree.map(chunk, null_text), u,
                   jnp.float32(user_scale), jnp.float32(guidance_scale),
                   jax.random.fold_in(jax.random.key(seed), first),
                   num_steps=int(num_steps), eta=float(eta), clip_sample=bool(clip_sample),
                   sampler=sampler, cfg=cascade_sampler.guidance_enabled(guidance_scale),
                   report=progress_lib.listening())
    x0 = np.asarray(x0)[:rows.stop - rows.start]
    if decode is not None:   # the backbone's to_images; Stable Cascade's Stage B reads the text
      x0 = decode(x0, text={k: np.asarray(v[rows]) for k, v in text.items()}, seed=seed + first)
    out.append(np.clip(x0, -1.0, 1.0))
    if progress is not None:
      rate = rows.stop / (time.perf_counter() - start)
      progress(f"  sampled {rows.stop}/{n} images  {rate:.1f} images/s  "
               f"ETA {(n - rows.stop) / rate:.0f}s")
  return np.concatenate(out)

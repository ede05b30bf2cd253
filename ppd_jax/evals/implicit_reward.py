"""DPO metrics of a trained user branch on a fixed set of pairs, without updating anything.

The implicit accuracy is the fraction of pairs for which the trained model ranks the user's
preferred image first: z = -beta/2 [(e_theta+ - e_ref+) - (e_theta- - e_ref-)] > 0. It is averaged
over `draws` fixed (t, eps) draws per pair, so two evaluations of the same params agree exactly.
t and eps come from the training step's own draw (step.draw_t_and_noise, the schedule's draw_t):
integer t in [0, T) for the DDPM schedules, continuous t in (t_min, 1] for Stable Cascade's.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ppd_jax import step as step_lib


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _metrics(loss_fn, user_params, base_params, batch, t, noise):
  return loss_fn(user_params, base_params, batch, t, noise)[1]


def evaluate_pairs(model, schedule, config, base_params, user_params, pairs: dict, *,
                   draws: int = 4, batch_size: int = 64, seed: int = 0) -> dict:
  """Mean DPO metrics over every pair in `pairs` (dict of stacked arrays, as gather returns).

  Draw d of the batch starting at pair `start` uses key fold_in(fold_in(key(seed), d), start):
  the same seed gives every pair the same (t, eps) in every evaluation."""
  loss_fn = step_lib.make_loss_fn(model, schedule, config)
  n = len(pairs["preferred"])
  keys = step_lib.batch_keys(config.model)
  root = jax.random.key(seed)
  totals, count = {}, 0
  for d in range(draws):
    for start in range(0, n, batch_size):
      batch = {k: jnp.asarray(pairs[k][start:start + batch_size]) for k in keys}
      b = len(batch["preferred"])
      key = jax.random.fold_in(jax.random.fold_in(root, d), start)
      t, noise = step_lib.draw_t_and_noise(key, batch, schedule)
      m = jax.device_get(_metrics(loss_fn, user_params, base_params, batch, t, noise))
      for k, v in m.items():
        if np.ndim(v) == 0:            # batch means; "z" is per pair
          totals[k] = totals.get(k, 0.0) + float(v) * b
      count += b
  return {k: v / count for k, v in totals.items()}

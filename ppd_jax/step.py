"""The jitted PPD train step: Diffusion-DPO gradient over the user branch only.

One step, for a global batch of B pairs:
  1. draw t [B] and eps [B, ...] once per pair (the same for both images of the pair);
  2. reference: the frozen base with the user branch off, under stop_gradient (same weights as
     the policy, so one copy in memory, and no backward pass through it);
  3. policy: base + user branch; value_and_grad with respect to the user params only, so no
     weight-gradient work is done for the frozen base;
  4. optionally over `grad_accum_steps` micro-batches (a lax.scan that sums gradients, then / accum);
  5. AdamW, applied only when the loss and every gradient are finite. A non-finite step (one bad
     embedding, a bf16 overflow) leaves params and optimizer state exactly as they were and is
     counted (`skipped_updates`, `nonfinite_streak`), so NaN can never reach the state or a
     checkpoint; the trainer stops after `optim.max_nonfinite_steps` in a row.

Layout: the two images of a pair are interleaved, rows (2i, 2i + 1) = (x0+_i, x0-_i), so with the
batch split over the mesh every device holds both images of its own pairs and building the
[2B] batch moves no row across devices (concatenating [x0+; x0-] would).
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ppd_jax import backbones
from ppd_jax import dpo
from ppd_jax import sharding as shd
from ppd_jax.models import merge_params

# Keys of a batch the step reads; anything else the loader yields (ids, ...) stays on the host.
BATCH_KEYS = ("preferred", "dispreferred", "text_embedding", "user_embedding")


def batch_keys(model_cfg) -> tuple[str, ...]:
  """What the step reads: the pairs, the user and the backbone's text conditioning keys."""
  return BATCH_KEYS + backbones.extra_text_keys(model_cfg)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  user_params: Any
  opt_state: Any
  skipped_updates: jax.Array      # steps whose update was dropped as non-finite, in total
  nonfinite_streak: jax.Array     # ... in a row, up to this step (0 after a finite step)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warm-up to a constant learning rate, after global-norm clipping."""
  o = config.optim
  if o.warmup_steps:
    # Step s (from 0) uses lr * min(1, (s + 1) / warmup): the first step already moves.
    lr = lambda s: o.lr * jnp.minimum(1.0, (s + 1) / o.warmup_steps)
  else:
    lr = optax.constant_schedule(o.lr)
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  return optax.chain(*parts), lr


def interleave_pairs(a: jax.Array, b: jax.Array) -> jax.Array:
  """[B, ...], [B, ...] -> [2B, ...] with rows (a_0, b_0, a_1, b_1, ...): device-local."""
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def split_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inverse of interleave_pairs: [2B, ...] -> (even rows, odd rows)."""
  x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
  return x[:, 0], x[:, 1]


def make_loss_fn(model, schedule, config) -> Callable:
  """loss(user_params, base_params, batch, t, noise) -> (loss, metrics) for one micro-batch.

  schedule: schedules.NoiseSchedule or cascade_schedule.CascadeSchedule (their draw_t / diffuse).

  metrics include "z" [B], the per-pair implicit reward margin, for validation."""
  beta, reduction, kind = config.dpo.beta, config.dpo.reduction, config.loss
  weighting = config.dpo.get("weighting", "none")

  def loss_fn(user_params, base_params, batch, t, noise):
    # Both images of a pair see the same t and eps; rows interleaved (module docstring).
    x0 = interleave_pairs(batch["preferred"], batch["dispreferred"])
    twice = lambda x: jnp.repeat(x, 2, axis=0)
    t2, eps = twice(t), twice(noise)
    # x_t, what the network sees as time (t, or Stable Cascade's r in float32), its target and
    # the p2 weight 1 - abar_t: the schedule's own forward process (schedules.py, cascade_schedule).
    x_t, model_t, target, p2 = schedule.diffuse(x0, eps, t2)
    text, added = backbones.unet_conditioning(
        {k: twice(batch[k]) for k in backbones.TEXT_KEYS if k in batch})
    user = twice(batch["user_embedding"])

    reference = jax.lax.stop_gradient(
        model.apply({"params": base_params}, x_t, model_t, text, None, 0.0, added))
    ref_w, ref_l = split_pairs(dpo.squared_error(target, reference, reduction))

    params = merge_params(base_params, user_params)
    policy = model.apply({"params": params}, x_t, model_t, text, user, 1.0, added)
    pol_w, pol_l = split_pairs(dpo.squared_error(target, policy, reduction))

    # dpo.weighting: none (Diffusion-DPO's omega = 1) or p2 (z scaled by each pair's 1 - abar_t).
    weight = split_pairs(p2)[0] if weighting == "p2" else None
    terms = dpo.dpo_terms(pol_w, pol_l, ref_w, ref_l, beta, weight)
    metrics = dpo.dpo_metrics(terms, pol_w, pol_l, ref_w, ref_l)
    if kind == "sft":
      metrics.update(dpo.sft_metrics(pol_w))
    return metrics["loss"], {**metrics, "z": terms.z}

  return loss_fn


def draw_t_and_noise(key: jax.Array, batch: dict, schedule) -> tuple[jax.Array, jax.Array]:
  """One timestep (the schedule's own draw: integer or continuous) and one noise per pair."""
  rng_t, rng_eps = jax.random.split(key)
  t = schedule.draw_t(rng_t, batch["preferred"].shape[0])
  return t, jax.random.normal(rng_eps, batch["preferred"].shape, jnp.float32)


def make_grad_fn(model, schedule, config, mesh=None) -> Callable:
  """grads(user_params, base_params, batch, t, noise) -> (mean gradient, mean metrics).

  With grad_accum_steps = A the pairs are cut into A micro-batches (strided rows, so each device
  keeps its own rows) whose gradients are summed by a lax.scan and divided by A: the gradient of
  the mean loss over the whole batch, as one big batch would give.
  """
  grad_fn = jax.value_and_grad(make_loss_fn(model, schedule, config), has_aux=True)
  accum = config.grad_accum_steps

  def per_pair_free(metrics):
    return {k: v for k, v in metrics.items() if k != "z"}

  if accum == 1:
    def grads(user_params, base_params, batch, t, noise):
      (_, metrics), g = grad_fn(user_params, base_params, batch, t, noise)
      return g, per_pair_free(metrics)
    return grads

  def to_micro(x):
    # [B, ...] -> [accum, B / accum, ...] taking strided rows, so that each device keeps its own
    # rows in every micro-batch (a plain reshape would put a micro-batch on a few devices).
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, shd.BATCH_AXES)))

  def grads(user_params, base_params, batch, t, noise):
    micro = jax.tree.map(to_micro, (batch, t, noise))

    def body(carry, xs):
      mb, mt, mn = xs
      (_, m), g = grad_fn(user_params, base_params, mb, mt, mn)
      return jax.tree.map(jnp.add, carry, g), per_pair_free(m)

    zeros = jax.tree.map(jnp.zeros_like, user_params)
    total, metrics = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda g: g / accum, total), jax.tree.map(jnp.mean, metrics)

  return grads


def all_finite(tree) -> jax.Array:
  """True iff every element of every leaf is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(model, schedule, config, tx, lr_schedule, mesh, state_shardings,
                    base_shardings) -> Callable:
  """Returns jitted step(state, base_params, batch, key) -> (state, metrics)."""
  keys = batch_keys(config.model)
  grads_fn = make_grad_fn(model, schedule, config, mesh)

  def step(state: TrainState, base_params, batch, key):
    # The mesh as context: layers.Dense/Conv gather their fsdp-sharded kernels where used.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      batch = {k: batch[k] for k in keys}
      t, noise = draw_t_and_noise(jax.random.fold_in(key, state.step), batch, schedule)
      grads, metrics = grads_fn(state.user_params, base_params, batch, t, noise)

      updates, opt_state = tx.update(grads, state.opt_state, state.user_params)
      user_params = optax.apply_updates(state.user_params, updates)
      # A non-finite loss or gradient keeps the old params and optimizer state, bit for bit.
      ok = jnp.isfinite(metrics["loss"]) & all_finite(grads)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      skipped = state.skipped_updates + jnp.where(ok, 0, 1).astype(jnp.int32)
      streak = jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32)
      metrics["grad_norm"] = optax.tree.norm(grads)
      metrics["learning_rate"] = lr_schedule(state.step)
      metrics["skipped_updates"] = skipped
      metrics["nonfinite_streak"] = streak
      new_state = TrainState(step=state.step + 1, user_params=keep(user_params, state.user_params),
                             opt_state=keep(opt_state, state.opt_state), skipped_updates=skipped,
                             nonfinite_streak=streak)
    return new_state, metrics

  batch_spec = shd.batch_sharding(mesh)
  return jax.jit(
      step,
      in_shardings=(state_shardings, base_shardings, batch_spec, shd.replicated(mesh)),
      out_shardings=(state_shardings, shd.replicated(mesh)),
      donate_argnums=(0,))

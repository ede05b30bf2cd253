"""The jitted PPD train step: Diffusion-DPO gradient over the user branch only.

One step, for a global batch of B pairs:
  1. draw t [B] and eps [B, ...] once per pair (the same for both images of the pair);
  2. reference: the frozen base with the user branch off, under stop_gradient (same weights as
     the policy, so one copy in memory, and no backward pass through it);
  3. policy: base + user branch; value_and_grad with respect to the user params only, so no
     weight-gradient work is done for the frozen base;
  4. optionally over `grad_accum_steps` micro-batches (a lax.scan that sums gradients), then AdamW.
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ppd_jax import backbone
from ppd_jax import dpo
from ppd_jax import sharding as shd
from ppd_jax.diffusion import schedules
from ppd_jax.models import merge_params

# Keys of a batch the step reads; anything else the loader yields (ids, ...) stays on the host.
BATCH_KEYS = ("preferred", "dispreferred", "text_embedding", "user_embedding")
SDXL_KEYS = ("pooled_text_embedding", "time_ids")


def batch_keys(model_cfg) -> tuple[str, ...]:
  """What the step reads: SDXL's UNet also takes the pooled text and the size time_ids."""
  extra = SDXL_KEYS if model_cfg.get("addition_embed_type") == "text_time" else ()
  return BATCH_KEYS + extra


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  user_params: Any
  opt_state: Any


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


def _split_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  half = x.shape[0] // 2
  return x[:half], x[half:]


def make_loss_fn(model, schedule: schedules.NoiseSchedule, config) -> Callable:
  """loss(user_params, base_params, batch, t, noise) -> (loss, metrics) for one micro-batch."""
  beta, reduction, kind = config.dpo.beta, config.dpo.reduction, config.loss

  def loss_fn(user_params, base_params, batch, t, noise):
    # Preferred images first, then dispreferred; both see the same t and eps.
    x0 = jnp.concatenate([batch["preferred"], batch["dispreferred"]])
    t2 = jnp.concatenate([t, t])
    eps = jnp.concatenate([noise, noise])
    x_t = schedules.add_noise(schedule, x0, eps, t2)
    target = schedules.training_target(schedule, x0, eps, t2)
    text, added = backbone.unet_conditioning(
        {k: jnp.concatenate([batch[k]] * 2) for k in backbone.TEXT_KEYS if k in batch})
    user = jnp.concatenate([batch["user_embedding"]] * 2)

    reference = jax.lax.stop_gradient(
        model.apply({"params": base_params}, x_t, t2, text, None, 0.0, added))
    ref_w, ref_l = _split_pairs(dpo.squared_error(target, reference, reduction))

    params = merge_params(base_params, user_params)
    policy = model.apply({"params": params}, x_t, t2, text, user, 1.0, added)
    pol_w, pol_l = _split_pairs(dpo.squared_error(target, policy, reduction))

    terms = dpo.dpo_terms(pol_w, pol_l, ref_w, ref_l, beta)
    metrics = dpo.dpo_metrics(terms, pol_w, pol_l, ref_w, ref_l)
    if kind == "sft":
      metrics.update(dpo.sft_metrics(pol_w))
    return metrics["loss"], metrics

  return loss_fn


def make_train_step(model, schedule, config, tx, lr_schedule, mesh, state_shardings,
                    base_shardings) -> Callable:
  """Returns jitted step(state, base_params, batch, key) -> (state, metrics)."""
  loss_fn = make_loss_fn(model, schedule, config)
  keys = batch_keys(config.model)
  accum = config.grad_accum_steps
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  micro_spec = NamedSharding(mesh, P(None, shd.BATCH_AXES))

  def to_micro(x):
    # [B, ...] -> [accum, B / accum, ...] taking strided rows, so that each device keeps its own
    # rows in every micro-batch (a plain reshape would put a micro-batch on a few devices).
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, micro_spec)

  def step(state: TrainState, base_params, batch, key):
    batch = {k: batch[k] for k in keys}
    rng = jax.random.fold_in(key, state.step)
    rng_t, rng_eps = jax.random.split(rng)
    b = batch["preferred"].shape[0]
    t = jax.random.randint(rng_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(rng_eps, batch["preferred"].shape, jnp.float32)

    if accum == 1:
      (_, metrics), grads = grad_fn(state.user_params, base_params, batch, t, noise)
    else:
      micro = jax.tree.map(to_micro, (batch, t, noise))

      def body(carry, xs):
        mb, mt, mn = xs
        (_, m), g = grad_fn(state.user_params, base_params, mb, mt, mn)
        return jax.tree.map(jnp.add, carry, g), m

      zeros = jax.tree.map(jnp.zeros_like, state.user_params)
      grads, metrics = jax.lax.scan(body, zeros, micro)
      grads = jax.tree.map(lambda g: g / accum, grads)
      metrics = jax.tree.map(jnp.mean, metrics)

    updates, opt_state = tx.update(grads, state.opt_state, state.user_params)
    user_params = optax.apply_updates(state.user_params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = lr_schedule(state.step)
    new_state = TrainState(step=state.step + 1, user_params=user_params, opt_state=opt_state)
    return new_state, metrics

  batch_spec = shd.batch_sharding(mesh)
  return jax.jit(
      step,
      in_shardings=(state_shardings, base_shardings, batch_spec, shd.replicated(mesh)),
      out_shardings=(state_shardings, shd.replicated(mesh)),
      donate_argnums=(0,))

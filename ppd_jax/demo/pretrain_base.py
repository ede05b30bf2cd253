"""Pretrains the demo's frozen base: a text-conditioned pixel diffusion model of the shape world.

    python -m ppd_jax.demo.pretrain_base --steps=4000 --out=ppd_jax/demo/base_16px.npz

Plain epsilon-prediction diffusion training of every base parameter (the user branch is not built):
    L = E_{x0, c, t, eps} || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c) ||^2
on freshly rendered images of demo_world/synthetic.py (a new batch every step, so no
over-fitting), their captions through the world's fixed text encoder, and the empty caption 10% of
the time so that classifier-free guidance works. The file keeps an exponential moving average of the
weights, which samples far better than the last iterate of so short a run. Deterministic for a given
--seed.

The packaged ppd_jax/demo/base_16px.npz was made by this command on a 2-core CPU (see its
`__meta__` for steps, time and loss); the demo only loads it, so its minutes go to PPD.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from configs import ppd
from ppd_jax import cli_logging
from ppd_jax.demo_world import synthetic
from ppd_jax.diffusion import schedules
from ppd_jax.models import base_weights, build_model, init_params, split_params

_STEPS = flags.DEFINE_integer("steps", 4000, "optimizer steps")
_BATCH = flags.DEFINE_integer("batch_size", 64, "images per step")
_LR = flags.DEFINE_float("lr", 1e-3, "peak learning rate (linear warm-up, cosine decay)")
_EMA = flags.DEFINE_float("ema", 0.999, "decay of the weight average that is saved")
_SEED = flags.DEFINE_integer("seed", 0, "seed of init, images and noise")
_OUT = flags.DEFINE_string("out", base_weights.resolve("demo"), "where the .npz goes")
_CAPTION_DROPOUT = 0.1


def make_pretrain_step(model, schedule, tx, ema_decay: float):
  """One jitted step: loss, AdamW update and the EMA, all on the base params."""

  def loss_fn(params, x0, text, t, noise):
    x_t = schedules.add_noise(schedule, x0, noise, t)
    pred = model.apply({"params": params}, x_t, t, text)
    return jnp.mean((pred - schedules.training_target(schedule, x0, noise, t)) ** 2)

  @jax.jit
  def step(params, ema, opt_state, x0, text, key):
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_n, x0.shape, x0.dtype)
    loss, grads = jax.value_and_grad(loss_fn)(params, x0, text, t, noise)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    return params, ema, opt_state, loss

  return step


def pretrain(steps: int, batch_size: int, lr: float, ema_decay: float, seed: int, out: str,
             log_every: int = 100) -> dict:
  config = ppd.get_config("demo")
  model = build_model(config.model)
  schedule = schedules.schedule_from_config(config.diffusion)
  params, _ = split_params(init_params(model, jax.random.key(seed)))
  lr_fn = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr_fn, weight_decay=1e-4))
  opt_state = tx.init(params)
  ema = params
  step = make_pretrain_step(model, schedule, tx, ema_decay)

  encoder = synthetic.make_text_encoder(config.model, config.data)
  table = encoder.encode(synthetic.captions_list() + [""])      # last row: unconditional
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  start, losses = time.perf_counter(), []
  for i in range(steps):
    attrs = synthetic.sample_attributes(rng, batch_size)
    ids = synthetic.caption_ids(attrs)
    ids = np.where(rng.random(batch_size) < _CAPTION_DROPOUT, len(table) - 1, ids)
    x0 = synthetic.render(attrs, config.model.sample_size)
    params, ema, opt_state, loss = step(params, ema, opt_state, x0, table[ids],
                                        jax.random.fold_in(key, i))
    losses.append(loss)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      mean = float(np.mean(jax.device_get(losses[-log_every:])))
      rate = (i + 1) / (time.perf_counter() - start)
      print(f"pretrain step {i + 1}/{steps}  loss {mean:.4f}  {rate * batch_size:.0f} images/s  "
            f"ETA {(steps - i - 1) / rate / 60:.1f} min", flush=True)
  seconds = time.perf_counter() - start
  meta = {"text_encoder_seed": synthetic.TEXT_ENCODER_SEED, "steps": steps,
          "batch_size": batch_size, "lr": lr, "ema": ema_decay, "seed": seed,
          "final_loss": float(np.mean(jax.device_get(losses[-log_every:]))),
          "seconds": round(seconds), "device": jax.devices()[0].device_kind}
  base_weights.save(out, jax.device_get(ema), config.model, **meta)
  print(f"wrote {out} after {seconds / 60:.1f} min", flush=True)
  return meta


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  del argv
  pretrain(_STEPS.value, _BATCH.value, _LR.value, _EMA.value, _SEED.value, _OUT.value)


if __name__ == "__main__":
  app.run(main)

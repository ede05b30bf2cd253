"""Train-step throughput of a config, against a forward pass of its frozen base in the same run.

  python benchmarks/train_step.py --config=configs/ppd.py:demo [--config.batch_size=64]
  python benchmarks/train_step.py --config=configs/ppd.py:tiny --repeats=1   (smallest: a smoke run)

A DPO step costs one reference forward (no gradient) plus one policy forward and backward over
both images of every pair. The backward needs input gradients through the whole UNet but weight
gradients for the user branch alone, so the step should cost about 3-4 base forwards over 2B
images; the printed ratio shows how close it gets.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from ppd_jax import batch_plan
from ppd_jax import cli_config
from ppd_jax import sharding as shd
from ppd_jax import state as state_lib
from ppd_jax import step as step_lib
from ppd_jax import throughput
from ppd_jax import sources
from ppd_jax.diffusion import schedules
from ppd_jax.models import build_model

cli_config.define_config_file("benchmarks/train_step.py", "configs/ppd.py:demo",
                              "configs/ppd.py:VARIANT")
flags.DEFINE_integer("repeats", 10, "timed calls of the step and of the forward, after a warm-up")


def _time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def main(_):
  c = flags.FLAGS.config
  print(batch_plan.resolve(c, jax.device_count()))   # grad_accum_steps from per_device_batch
  mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp)
  model = build_model(c.model)
  tx, lr = step_lib.make_optimizer(c)
  state, base, st_sh, base_sh = state_lib.create_train_state(model, tx, mesh, c.seed)
  step = step_lib.make_train_step(model, schedules.schedule_from_config(c.diffusion), c, tx, lr,
                                  mesh, st_sh, base_sh)
  local = sources.build_source(c).gather(np.arange(c.batch_size))
  batch = shd.global_batch({k: local[k] for k in step_lib.batch_keys(c.model)}, mesh)
  key = jax.random.key(0)

  holder = {"state": state}

  def train():
    holder["state"], metrics = step(holder["state"], base, batch, key)
    return metrics

  x = step_lib.interleave_pairs(batch["preferred"], batch["dispreferred"])
  t = jnp.full((x.shape[0],), 500, jnp.int32)
  text = jnp.repeat(batch["text_embedding"], 2, axis=0)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, t, text, None))

  repeats = flags.FLAGS.repeats
  t_step = _time(train, repeats)
  t_fwd = _time(lambda: forward(base, x), repeats)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; config "
        f"{c.get('variant', '?')}, batch {c.batch_size} pairs, dtype {c.model.dtype}, "
        f"remat {c.model.remat}")
  print(f"train step      {t_step * 1e3:8.1f} ms   {c.batch_size / t_step:8.1f} pairs/s")
  print(f"base forward 2B {t_fwd * 1e3:8.1f} ms   (reference, same run)")
  print(f"ratio step / forward: {t_step / t_fwd:.2f} (ideal about 3-4)")
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  speed = throughput.Throughput(throughput.step_flops(c, shapes), jax.device_count(),
                                jax.devices()[0].device_kind)(1.0 / t_step)
  if "tflops_per_device" not in speed:
    print("FLOPs not counted: no TFLOP/s or MFU")
    return
  mfu = f", MFU {100 * speed['mfu']:.1f}%" if "mfu" in speed else " (no peak known: no MFU)"
  print(f"{speed['tflops_per_device']:.4g} TFLOP/s per device{mfu}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli_config.flags_parser("benchmarks/train_step.py"))

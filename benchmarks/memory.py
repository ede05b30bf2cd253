"""Per-device memory of the full-size train step, ahead of time: nothing is allocated.

    python benchmarks/memory.py --what=fsdp [--variants=sd15,sdxl]
    python benchmarks/memory.py --what=attention

The step is lowered with abstract inputs (ShapeDtypeStructs carrying their shardings) on 8 fake
CPU devices and compiled; `compiled.memory_analysis()` gives what one device would hold:
arguments (params, optimizer state, batch), outputs, and temporaries (activations kept for the
backward pass, attention logits, gathered kernels). Random weights: only shapes matter.

  fsdp       data=8 x fsdp=1 against data=1 x fsdp=8, same global batch (8 pairs per device):
             FSDP splits the frozen base (stored in bf16) and the user branch with its Adam
             moments over the 8 devices, and gathers each kernel where it is used.
  attention  one device, 16 pairs (32 images) of SD 1.5 at 64x64 latents: XLA's plain attention,
             which holds [32, 8, 4096, 4096] float32 logits in the first blocks, against the
             query-chunked kernel of models/attention_kernels.py.

The figures are the CPU compiler's buffer assignment, a proxy for a GPU's (XLA's GPU scheduler
orders work differently); the ratios are the point.
"""
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from configs import ppd  # noqa: E402
from ppd_jax import sharding as shd  # noqa: E402
from ppd_jax import state as state_lib  # noqa: E402
from ppd_jax import step as step_lib  # noqa: E402
from ppd_jax.diffusion import schedules  # noqa: E402
from ppd_jax.models import build_model, init_params, split_params  # noqa: E402

flags.DEFINE_enum("what", "fsdp", ["fsdp", "attention"], "which comparison")
flags.DEFINE_list("variants", ["sd15", "sdxl"], "configs/ppd.py variants for --what=fsdp")
flags.DEFINE_integer("pairs_per_device", 8, "--what=fsdp: pairs per device")
FLAGS = flags.FLAGS

GiB = 1 << 30


def _config(variant: str, batch: int, **model):
  c = ppd.get_config(variant)
  c.model.pretrained = ""            # random base: shapes only, no download
  c.batch_size = batch
  c.grad_accum_steps = 1
  c.model.user_tokens, c.model.user_embed_dim = 1, 3584
  for k, v in model.items():
    c.model[k] = v
  return c


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def compiled_step(c, mesh):
  """The train step compiled for abstract inputs on `mesh`; (compiled, seconds to compile)."""
  model = build_model(c.model)
  tx, lr = step_lib.make_optimizer(c)
  st_sh, base_sh = state_lib.state_shardings(model, tx, mesh)
  key = jax.random.key(0)

  def init(r):
    base, user = split_params(init_params(model, r))
    zero = jnp.zeros((), jnp.int32)
    return state_lib.frozen_storage(base, model.config.dtype), step_lib.TrainState(
        zero, user, tx.init(user), zero, zero)

  base_shape, state_shape = jax.eval_shape(init, key)
  m, b = c.model, c.batch_size
  side, text = m.sample_size, c.data.text_length
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=shd.batch_sharding(mesh))
  batch = {"preferred": f32(b, side, side, m.in_channels),
           "dispreferred": f32(b, side, side, m.in_channels),
           "text_embedding": f32(b, text, m.cross_attention_dim),
           "user_embedding": f32(b, m.user_tokens, m.user_embed_dim)}
  if m.addition_embed_type == "text_time":
    pooled = m.projection_class_embeddings_input_dim - 6 * m.addition_time_embed_dim
    batch.update(pooled_text_embedding=f32(b, pooled), time_ids=f32(b, 6))
  fn = step_lib.make_train_step(model, schedules.schedule_from_config(c.diffusion), c, tx, lr,
                                mesh, st_sh, base_sh)
  t0 = time.perf_counter()
  compiled = fn.lower(_abstract(state_shape, st_sh), _abstract(base_shape, base_sh), batch,
                      key).compile()
  return compiled, time.perf_counter() - t0


def _row(name: str, compiled, seconds: float) -> dict:
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  print(f"{name:34s} args {m.argument_size_in_bytes / GiB:7.2f} GiB  out "
        f"{m.output_size_in_bytes / GiB:6.2f}  temp {m.temp_size_in_bytes / GiB:7.2f}  "
        f"alias {m.alias_size_in_bytes / GiB:6.2f}  total {total / GiB:7.2f} GiB  "
        f"(compiled in {seconds:.0f} s)", flush=True)
  return {"args": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes, "total": total}


def fsdp():
  n = jax.device_count()
  for variant in FLAGS.variants:
    rows = {}
    for data, fs in ((n, 1), (1, n)):
      c = _config(variant, FLAGS.pairs_per_device * n)
      mesh = shd.make_mesh(data, fs)
      rows[fs] = _row(f"{variant} data={data} x fsdp={fs}", *compiled_step(c, mesh))
    print(f"{variant}: per-device total fsdp={n} / fsdp=1 = "
          f"{rows[n]['total'] / rows[1]['total']:.2f}; arguments "
          f"{rows[n]['args'] / rows[1]['args']:.2f}", flush=True)


def attention():
  mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
  rows = {}
  for impl in ("xla", "chunked"):
    c = _config("sd15", 16, attention_impl=impl)
    rows[impl] = _row(f"sd15 16 pairs, attention={impl}", *compiled_step(c, mesh))
  print(f"sd15 16 pairs: temp chunked / plain = "
        f"{rows['chunked']['temp'] / rows['xla']['temp']:.3f}", flush=True)


def main(_):
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; jax {jax.__version__}")
  {"fsdp": fsdp, "attention": attention}[FLAGS.what]()


if __name__ == "__main__":
  app.run(main)

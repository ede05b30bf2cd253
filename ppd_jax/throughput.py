"""Model FLOPs of a train step (counted from its jaxpr) and MFU against the device's peak.

    TFLOP/s per device = flops_per_step / step_seconds / devices
    MFU                = TFLOP/s per device / peak dense bf16 TFLOP/s of the device kind

flops_per_step is the matmul and convolution count (flop_count.py) of the jaxpr of the step's
gradient computation for one micro-batch, with plain attention and no remat, times
grad_accum_steps. Why a jaxpr: XLA's cost analysis is None on the PJRT C-API backends (CUDA
plugin, libtpu), while tracing works on every backend and compiles nothing. Why not the real step:
its loops (gradient accumulation's scan, chunked attention's map) and remat's recomputation are
hardware work, not model work, and MFU conventionally leaves recomputation out.
"""
import dataclasses

import jax
import jax.numpy as jnp

from ppd_jax import flop_count

# Dense bf16 peak TFLOP/s by device kind (jax.Device.device_kind), first match wins: the H100
# PCIe and NVL cards have lower clocks than the SXM part, whose kind is "NVIDIA H100 80GB HBM3".
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """The table's peak for a device kind; None for CPUs and kinds it does not list."""
  for name, peak in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def micro_step_trace(config, batch_shapes: dict) -> jax.stages.Traced:
  """The traced gradient computation of one micro-batch (plain attention, no remat).

  batch_shapes: {key: ShapeDtypeStruct} of the global batch the step reads (step.batch_keys).
  """
  from ppd_jax import step as step_lib
  from ppd_jax.diffusion import schedules
  from ppd_jax.models import build_model, init_params, split_params
  plain = config.model.to_dict()
  plain.update(attention_impl="xla", remat=False)
  model = build_model(plain)
  schedule = schedules.schedule_from_config(config.diffusion)
  accum = config.grad_accum_steps
  micro_cfg = config.copy_and_resolve_references()
  with micro_cfg.unlocked():
    micro_cfg.grad_accum_steps = 1
  grads = step_lib.make_grad_fn(model, schedule, micro_cfg)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  base, user = split_params(params)
  micro = {k: jax.ShapeDtypeStruct((v.shape[0] // accum,) + tuple(v.shape[1:]), v.dtype)
           for k, v in batch_shapes.items()}
  b = micro["preferred"].shape[0]
  t = jax.eval_shape(lambda k: schedule.draw_t(k, b), jax.random.key(0))   # int32 or float32
  noise = jax.ShapeDtypeStruct(micro["preferred"].shape, jnp.float32)
  return jax.jit(grads).trace(user, base, micro, t, noise)


def count_step_flops(config, batch_shapes: dict) -> float:
  """Model FLOPs of one optimizer step over the global batch; raises if it cannot count."""
  return flop_count.jaxpr_flops(micro_step_trace(config, batch_shapes).jaxpr) * (
      config.grad_accum_steps)


def step_flops(config, batch_shapes: dict) -> float | None:
  """count_step_flops, or None if counting fails: a missing count must not stop a run."""
  try:
    return count_step_flops(config, batch_shapes)
  except Exception:  # noqa: BLE001 -- any failure only costs the TFLOP/s figure
    return None


@dataclasses.dataclass
class Throughput:
  """Turns step time into TFLOP/s per device and MFU; nothing when the FLOPs were not counted."""
  flops_per_step: float | None
  devices: int
  device_kind: str

  def __call__(self, steps_per_second: float) -> dict:
    if self.flops_per_step is None:
      return {}
    tflops = self.flops_per_step * steps_per_second / self.devices / 1e12
    out = {"tflops_per_device": tflops}
    peak = peak_tflops(self.device_kind)
    if peak:
      out["mfu"] = tflops / peak
    return out

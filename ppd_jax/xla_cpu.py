"""Keeps bfloat16 UNets from aborting the process on XLA's CPU backend.

jax 0.10.2's CPU backend hands some bf16 fusions of a UNet (32x32 latents and above, or 16x16
with three down blocks) to YNNPACK, whose emitter then fails a CHECK (`ynn_emitter.cc:201 ...
reshape vs. bitcast`) and aborts the whole process. Limiting YNNPACK to single dots and
convolutions avoids it at no cost that matters. XLA reads XLA_FLAGS once, when the first backend
starts, so this must run before any computation: ppd_jax/__init__.py calls it on import.

Applied only when the process will run on the CPU (JAX_PLATFORMS says cpu, or no GPU/TPU plugin
is installed), since an XLA built without the flag (another jaxlib, on an accelerator) would
refuse it at start-up; a flag the user set is left alone.
"""
import importlib.util
import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
                        "jax_plugins.xla_cuda13", "libtpu", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")


def _will_run_on_cpu() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", ""))
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  for name in _ACCELERATOR_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):
      continue
  return True


def avoid_ynn_bf16_abort() -> bool:
  """Adds FLAG to XLA_FLAGS if the run will be on the CPU and XLA has not started; True if set."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in flags or not _will_run_on_cpu():
    return False
  import sys
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():   # too late: a backend already read XLA_FLAGS
      return False
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True

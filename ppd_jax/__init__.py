"""PPD (arXiv 2501.06655) in JAX/Flax. Importing the package guards XLA's CPU backend against a
bf16 abort (xla_cpu.py) before any backend starts."""
from ppd_jax import xla_cpu as _xla_cpu

_xla_cpu.avoid_ynn_bf16_abort()

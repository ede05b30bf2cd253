"""Makes this CPU process answer cost analysis as a PJRT C-API backend (CUDA plugin, libtpu) does.

Put this folder first on PYTHONPATH; Python imports sitecustomize at start-up. On a C-API backend
`Lowered.cost_analysis()` is None: jax/_src/interpreters/pxla.py, MeshComputation.cost_analysis,
raises NotImplementedError when `xb.using_pjrt_c_api(backend)`, and jax/_src/stages.py,
Lowered.cost_analysis, turns that into None (jax-ml/jax#22713). `Compiled.cost_analysis()`
(jax/_src/stages.py) returns None the same way when the executable raises NotImplementedError;
both are None here, the worst case a program must survive.

The patch waits for jax/_src/stages.py to be imported, so that this file imports no jax itself
and a program may still set JAX_PLATFORMS, XLA_FLAGS and the like before importing jax.
Set PPD_C_API_BACKEND_QUIET=1 to drop the line it prints to stderr.
"""
import importlib.abc
import importlib.machinery
import os
import sys

_MODULE = "jax._src.stages"


def _patch(stages) -> None:
  def no_cost_analysis(self):
    del self
    return None

  stages.Lowered.cost_analysis = no_cost_analysis
  stages.Compiled.cost_analysis = no_cost_analysis
  if not os.environ.get("PPD_C_API_BACKEND_QUIET"):
    print("c_api_backend: Lowered/Compiled.cost_analysis() return None", file=sys.stderr)


class _Loader(importlib.abc.Loader):
  """Runs the real loader, then patches the module it made."""

  def __init__(self, loader):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    self._loader.exec_module(module)
    _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name != _MODULE:
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path, target)
    if spec is not None and spec.loader is not None:
      spec.loader = _Loader(spec.loader)
    return spec


if _MODULE in sys.modules:
  _patch(sys.modules[_MODULE])
else:
  sys.meta_path.insert(0, _Finder())

"""The PyTorch reference for ppd_jax/models/effnet.py: timm's EfficientNetV2-S, torchvision-named.

Why timm: torchvision (whose efficientnet_v2_s().features Stable Cascade uses) cannot be installed
here (PITFALLS.md). timm is an independent implementation of the same network (Ross Wightman's,
after Google's reference; other module tree, other block code). `efficientnetv2_s` with
bn_eps=1e-3 is torchvision's architecture: the same stages, widths, expansion, SE from the block
input (timm divides se 0.25 by the expansion), symmetric padding, SiLU, and 21,458,488 parameters
(torchvision's documented count); timm's own default eps is 1e-5 and `tf_efficientnetv2_s` pads
"SAME", so neither default matches as is.

timm is installed with --no-deps (`make test`): its model code never calls torchvision, but
timm.layers (FrozenBatchNorm2d, for its freeze utilities) and timm.data (transforms, datasets)
import it at module level. `import_timm_efficientnet` serves stub modules for torchvision.* only
while importing, then removes them; transformers is imported first, so its (cached) torchvision
check never sees them. `timm_effnet` checks that no module of the built model is a stub.

TIMM_TO_TORCHVISION maps timm's names to torchvision's module paths (`features.<i>...`), which
Stable Cascade's file keeps under `backbone.`.
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import types

import numpy as np

TIMM_VERSION = "1.0.31"
INSTALL = f"pip install --no-deps timm=={TIMM_VERSION}"


class _Placeholder(type):
  """Any attribute of a stub is a new placeholder class (hashable, subclassable, never called by
  the EfficientNet code path)."""

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Placeholder(name, (), {})


class _StubModule(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Placeholder(name, (), {})


class _TorchvisionStubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves `torchvision` and every `torchvision.*` as an empty stub package."""

  def find_spec(self, name, path, target=None):
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    return _StubModule(spec.name)

  def exec_module(self, module):
    module.__path__ = []


def import_timm_efficientnet():
  """timm.models.efficientnet, imported without torchvision; None if timm is not installed."""
  if importlib.util.find_spec("timm") is None:
    return None
  import transformers.modeling_outputs  # noqa: F401 - before the stubs (see the docstring)
  from transformers.utils import import_utils
  assert not import_utils.is_torchvision_available()
  finder = _TorchvisionStubs()
  sys.meta_path.insert(0, finder)
  try:
    module = importlib.import_module("timm.models.efficientnet")
  finally:
    sys.meta_path.remove(finder)
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
  assert importlib.util.find_spec("torchvision") is None
  return module


def timm_effnet(timm_efficientnet):
  """timm's efficientnetv2_s with torchvision's BatchNorm eps, in eval mode."""
  model = timm_efficientnet.efficientnetv2_s(bn_eps=1e-3).eval()
  stubs = [n for n, m in model.named_modules() if isinstance(type(m), _Placeholder)]
  assert not stubs, f"timm built stub (torchvision) modules: {stubs}"
  return model


# Per timm block class: its layer names -> torchvision's `block.<k>` Sequential entries.
_BLOCK_LAYERS = {
    # stage 1 (FusedMBConv, expand 1): Conv2dNormActivation only
    "ConvBnAct": {"conv": "0.0", "bn1": "0.1"},
    # stages 2-3 (FusedMBConv, expand 4): fused expand conv kxk, project conv1x1
    "EdgeResidual": {"conv_exp": "0.0", "bn1": "0.1", "conv_pwl": "1.0", "bn2": "1.1"},
    # stages 4-6 (MBConv): expand, depthwise, SE, project
    "InvertedResidual": {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1",
                         "se.conv_reduce": "2.fc1", "se.conv_expand": "2.fc2",
                         "conv_pwl": "3.0", "bn3": "3.1"},
}
_TOP = {"conv_stem": "0.0", "bn1": "0.1", "conv_head": "7.0", "bn2": "7.1"}
_LEAF = re.compile(r"(.+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def torchvision_key(model, timm_key: str) -> str | None:
  """timm state-dict key -> torchvision's `features` key (without `features.`); None for the
  classifier (not part of `.features`)."""
  if timm_key.startswith("classifier."):
    return None
  layer, leaf = _LEAF.fullmatch(timm_key).groups()
  m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", layer)
  if m is None:
    return f"{_TOP[layer]}.{leaf}"
  stage, block, inner = int(m[1]), int(m[2]), m[3]
  kind = type(model.blocks[stage][block]).__name__
  return f"{stage + 1}.{block}.block.{_BLOCK_LAYERS[kind][inner]}.{leaf}"


def backbone_state_dict(model, prefix: str = "backbone.") -> dict[str, np.ndarray]:
  """timm's state dict under Stable Cascade's key names (`backbone.<torchvision features key>`)."""
  out = {}
  for key, value in model.state_dict().items():
    name = torchvision_key(model, key)
    if name is not None:
      assert prefix + name not in out, f"two timm keys map to {prefix + name}"
      out[prefix + name] = value.detach().numpy().copy()
  return out

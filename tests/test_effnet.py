"""Flax EfficientNetV2-S encoder (models/effnet.py) vs an independent PyTorch reference: timm's
efficientnetv2_s with torchvision's BatchNorm eps (tests/effnet_reference.py says why it is
torchvision's network), under Stable Cascade's key names, plus a torch.nn mapper.

Full-size architecture at 64 px (and 64 x 96), float32, every BatchNorm with random running
statistics (calibrated on data, then moved: nonzero means, variances from 0.02 to ~13, so eps
1e-3 vs 1e-5 shows) and random affine parameters and biases.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from torch_layout import nchw, nhwc
from ppd_jax.models import effnet
from ppd_jax.weights import convert

torch = pytest.importorskip("torch")
import effnet_reference as reference  # noqa: E402

TOL = 1e-4   # max |ours - torch| / max |torch|; observed 2e-6 to 4e-6 (features), <4e-7 (x0)
FEATURES_COUNT = 21_458_488 - (1280 * 1000 + 1000)   # torchvision's num_params - classifier
MAPPER_COUNT = 1280 * 16


@pytest.fixture(scope="module")
def timm_efficientnet():
  module = reference.import_timm_efficientnet()
  if module is None:
    pytest.fail(f"timm is not installed: `make test` installs it ({reference.INSTALL}); it is "
                "this test's reference")
  return module


def _randomise(model: "torch.nn.Module", run, x, gen) -> None:
  """Random affine params and biases; running statistics measured by `run(model, x)` in train
  mode (so that the 40 blocks stay finite), then shifted and rescaled per channel."""
  randn = lambda shape: torch.randn(shape, generator=gen)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.add_(0.1 * randn(p.shape))
      elif p.ndim == 1:   # BatchNorm weight
        p.copy_(1 + 0.2 * randn(p.shape))
    for bn in bns:
      bn.reset_running_stats()
      bn.momentum = None   # cumulative average over the calibration pass
    model.train()
    run(model, x)
    model.eval()
    for bn in bns:
      bn.running_mean.add_(0.1 * bn.running_var.sqrt() * randn(bn.running_mean.shape))
      scale = 0.7 + 0.7 * torch.rand(bn.running_var.shape, generator=gen)
      bn.running_var.mul_(scale).clamp_(min=0.02)
      bn.momentum = 0.1


@pytest.fixture(scope="module")
def ref(timm_efficientnet):
  """(timm backbone, torch mapper, Stable-Cascade-named state dict, our variables)."""
  gen = torch.Generator().manual_seed(0)
  torch.manual_seed(0)
  backbone = reference.timm_effnet(timm_efficientnet)
  x = torch.randn((8, 3, 128, 128), generator=gen)   # 64 px would leave 2 x 2 deep maps: noisy
  _randomise(backbone, lambda m, x: m.forward_features(x), x, gen)
  mapper = torch.nn.Sequential(torch.nn.Conv2d(1280, 16, kernel_size=1, bias=False),
                               torch.nn.BatchNorm2d(16, affine=False))   # Stability-AI's mapper
  with torch.no_grad():
    feats = backbone.forward_features(x)
    mapper[0].weight.mul_(0.05)   # running_var ~2e-2 there, so that its eps (1e-5) shows too
  _randomise(mapper, lambda m, x: m(x), feats, gen)
  state = reference.backbone_state_dict(backbone)
  state.update({f"mapper.{k}": v.numpy().copy() for k, v in mapper.state_dict().items()})
  return backbone, mapper, state, effnet.variables_from_state_dict(state)


def _rel_err(actual, expected) -> float:
  expected = np.asarray(expected, np.float32)
  return float(np.max(np.abs(np.asarray(actual, np.float32) - expected)) / np.max(np.abs(expected)))


@jax.jit
def _features_and_x0(variables, x):
  module = effnet.EfficientNetEncoder()
  feats = module.apply(variables, x, method=effnet.EfficientNetEncoder.features)
  return feats, module.apply(variables, feats, method=effnet.EfficientNetEncoder.mapper)


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 64, 96, 3)], ids=["64x64", "64x96"])
def test_features_and_mapper_match_timm(ref, shape):
  """backbone(x) and mapper(backbone(x)) for a normalised input, on even sizes (where "SAME"
  padding would differ from PyTorch's)."""
  backbone, mapper, _, variables = ref
  x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  with torch.no_grad():
    want_feats = backbone.forward_features(nchw(x))
    want_x0 = mapper(want_feats)
  feats, x0 = _features_and_x0(variables, jnp.asarray(x))
  grid = (shape[1] // 32, shape[2] // 32)
  assert feats.shape == (shape[0], *grid, 1280) and x0.shape == (shape[0], *grid, 16)
  assert _rel_err(feats, nhwc(want_feats)) < TOL
  assert _rel_err(x0, nhwc(want_x0)) < TOL


# Stability-AI's effnet_preprocess (train/train_c.py), written out here, not taken from effnet.py.
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _torch_preprocess(images: np.ndarray, size: int) -> "torch.Tensor":
  """Stability-AI's path on [0, 1] images: torchvision's Resize(size, BILINEAR, antialias=True)
  on a float tensor is interpolate(align_corners=False, antialias=True) to (short = size, long =
  int(size * long / short)); then Normalize(ImageNet mean, std)."""
  x = nchw((images + 1) / 2)
  h, w = x.shape[-2:]
  out = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
  if (h, w) != out:
    x = torch.nn.functional.interpolate(x, size=out, mode="bilinear", align_corners=False,
                                        antialias=True)
  return (x - _MEAN) / _STD


@pytest.mark.parametrize("shape", [(2, 150, 100, 3), (1, 37, 53, 3), (1, 64, 64, 3)],
                         ids=["shrink", "enlarge", "identity"])
def test_preprocess_matches_torch_antialiased_resize(shape):
  images = np.random.default_rng(2).uniform(-1, 1, shape).astype(np.float32)
  got = jax.jit(effnet.preprocess, static_argnums=1)(jnp.asarray(images), 64)
  want = nhwc(_torch_preprocess(images, 64))
  assert got.shape == want.shape and min(got.shape[1:3]) == 64
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_encode_end_to_end(ref):
  """[-1, 1] images -> resize -> normalise -> features -> mapper, against the torch chain."""
  backbone, mapper, _, variables = ref
  images = np.random.default_rng(3).uniform(-1, 1, (1, 80, 120, 3)).astype(np.float32)
  with torch.no_grad():
    want = mapper(backbone.forward_features(_torch_preprocess(images, 64)))
  fn = jax.jit(effnet.images_to_latents, static_argnums=(0, 3))
  got = fn(effnet.EfficientNetEncoder(), variables, jnp.asarray(images), 64)
  assert got.shape == (1, 2, 3, 16)
  assert _rel_err(got, nhwc(want)) < TOL


@pytest.mark.parametrize("pixels", [768, 1024, 512])
def test_x0_is_24x24x16(pixels):
  """Stage C's x0 grid: any square input is resized to 768 px -> [B, 24, 24, 16] float32."""
  module = effnet.EfficientNetEncoder()
  variables = jax.eval_shape(lambda k: effnet.init_variables(module, k), jax.random.key(0))
  images = jax.ShapeDtypeStruct((2, pixels, pixels, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: effnet.images_to_latents(module, v, x), variables, images)
  assert out.shape == (2, 24, 24, 16) and out.dtype == jnp.float32


def _flax_torch_keys(variables) -> set[str]:
  leaf = {"kernel": "weight", "scale": "weight"}
  return {convert.torch_key(path[:-1] + (leaf.get(path[-1], path[-1]),))
          for path in traverse_util.flatten_dict(variables)}


def test_tree_matches_checkpoint_keys(ref):
  """Key for key: every param and statistic is a key of the file, and every key of the file but
  num_batches_tracked is one, with literal keys of torchvision's layout as anchors."""
  _, _, state, variables = ref
  ours = _flax_torch_keys(variables["params"]) | _flax_torch_keys(variables["batch_stats"])
  theirs = {k for k in state if not k.endswith(".num_batches_tracked")}
  # torchvision's features: 780 keys, 110 of them a BatchNorm's num_batches_tracked; mapper: 3
  assert ours == theirs and len(ours) == 780 - 110 + 3
  for key in ("backbone.0.0.weight", "backbone.0.1.running_var", "backbone.1.1.block.0.0.weight",
              "backbone.2.0.block.1.1.bias", "backbone.4.5.block.2.fc2.bias",
              "backbone.6.14.block.3.1.running_mean", "backbone.7.0.weight",
              "backbone.7.1.weight", "mapper.0.weight", "mapper.1.running_var"):
    assert key in ours
  assert not any(k.startswith("mapper.1.") and k.endswith(("weight", "bias")) for k in ours)
  flat = traverse_util.flatten_dict(variables["params"])
  assert flat[("backbone_4_0", "block_2", "fc1", "kernel")].shape == (1, 1, 256, 16)  # 64 // 4
  assert flat[("backbone_6_1", "block_2", "fc1", "kernel")].shape == (1, 1, 1536, 64)  # 256 // 4
  assert flat[("backbone_0_0", "kernel")].shape == (3, 3, 3, 24)


@pytest.mark.parametrize("edit, named", [
    ("drop", "backbone.4.0.block.2.fc1.weight"),
    ("drop", "backbone.6.14.block.1.1.running_var"),
    ("drop", "mapper.0.weight"),
    ("add", "backbone.8.0.weight"),
    ("reshape", "backbone.5.3.block.2.fc1.weight"),
])
def test_loading_errors_name_the_key(ref, edit, named):
  state = dict(ref[2])
  if edit == "drop":
    del state[named]
  elif edit == "add":
    state[named] = np.zeros((4, 4, 1, 1), np.float32)
  else:   # an SE squeeze sized from the expanded channels (768 // 4) instead of 128 // 4
    state[named] = np.zeros((192, 768, 1, 1), np.float32)
  with pytest.raises(convert.WeightsError, match=named.replace(".", r"\.")):
    effnet.variables_from_state_dict(state)


def test_full_size_counts(timm_efficientnet):
  """Params (eval_shape, no weights): features 20,177,488 (torchvision's 21,458,488 less the
  classifier, and timm's model agrees), mapper 20,480; BatchNorm statistics are buffers."""
  module = effnet.EfficientNetEncoder()
  variables = jax.eval_shape(lambda k: effnet.init_variables(module, k), jax.random.key(0))
  count = lambda tree, top: sum(int(np.prod(v.shape)) for p, v in
                                traverse_util.flatten_dict(tree).items() if p[0].startswith(top))
  assert count(variables["params"], "backbone") == FEATURES_COUNT == 20_177_488
  assert count(variables["params"], "mapper") == MAPPER_COUNT == 20_480
  assert count(variables["batch_stats"], "backbone") == 153_872
  assert count(variables["batch_stats"], "mapper") == 32
  model = reference.timm_effnet(timm_efficientnet)
  assert sum(p.numel() for n, p in model.named_parameters()
             if not n.startswith("classifier")) == FEATURES_COUNT

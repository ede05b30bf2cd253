"""Stable Cascade's EfficientNetV2-S image encoder (Stage C's x0) in Flax linen, NHWC, eval only.

Stability-AI's `modules/effnet.py`: `torchvision.models.efficientnet_v2_s().features`, then a
mapper `Sequential(Conv2d(1280, 16, 1, bias=False), BatchNorm2d(16, affine=False))`. Its file
effnet_encoder.safetensors holds that module's state dict, keys `backbone.*` and `mapper.*`; Flax
param paths are those keys under the naming rule of ppd_jax.weights.convert
(`backbone.4.2.block.2.fc1.weight` -> `backbone_4_2/block_2/fc1/kernel`), BatchNorm's running
statistics in a "batch_stats" collection. Load it with `variables_from_state_dict` (one call).

    features:  stem  conv3x3 s2 (3 -> 24) + BN + SiLU                         backbone.0
               6 stages of FusedMBConv / MBConv blocks (STAGES)               backbone.1 .. 6
               head  conv1x1 (256 -> 1280) + BN + SiLU                        backbone.7
    mapper:    conv1x1 (1280 -> 16, no bias) + BN (no affine)                 mapper.0, mapper.1
    x0 = mapper(features(normalize_imagenet(resize_768(img in [0, 1]))))     [B, 24, 24, 16]

Every BatchNorm runs on its running statistics (PyTorch eval mode); stochastic depth (train only)
is the identity and has no code here. The facts below are torchvision 0.28's efficientnet.py.
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppd_jax.models import layers
from ppd_jax.weights import convert

Dtype = Any

BN_EPS = 1e-3          # efficientnet_v2_s: norm_layer=partial(nn.BatchNorm2d, eps=1e-03)
MAPPER_BN_EPS = 1e-5   # the mapper's BatchNorm2d(16, affine=False): PyTorch's default eps
IMAGENET_MEAN = (0.485, 0.456, 0.406)   # Stability-AI's effnet_preprocess (train_b/train_c.py)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 768       # Stage C's training resolution -> a 24 x 24 grid (stride 32)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One row of torchvision's inverted_residual_setting; only a stage's first block has
  `stride` and `in_channels`, the others are stride 1, out -> out. Blocks take their input width
  from the previous layer, so only the first stage's in_channels is read (the stem's width)."""
  fused: bool          # FusedMBConv (no depthwise, no SE) or MBConv (+ SE)
  expand_ratio: int
  kernel: int
  stride: int
  in_channels: int
  out_channels: int
  num_layers: int


# efficientnet_v2_s (torchvision _efficientnet_conf): stem 24, head 1280.
STAGES = (
    Stage(True, 1, 3, 1, 24, 24, 2),
    Stage(True, 4, 3, 2, 24, 48, 4),
    Stage(True, 4, 3, 2, 48, 64, 4),
    Stage(False, 4, 3, 2, 64, 128, 6),
    Stage(False, 6, 3, 1, 128, 160, 9),
    Stage(False, 6, 3, 2, 160, 256, 15),
)
HEAD_CHANNELS = 1280
LATENT_CHANNELS = 16


def _make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's channel rounding (a no-op for V2-S's widths): nearest multiple of 8, never
  below 90% of v."""
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * v else new


class BatchNorm(nn.Module):
  """BatchNorm2d in eval mode, in float32:  y = (x - running_mean) / sqrt(running_var + eps)
  [* scale + bias when affine]. Statistics live in "batch_stats" (PyTorch buffers)."""
  eps: float
  affine: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,), jnp.float32).value
    var = self.variable("batch_stats", "running_var", jnp.ones, (c,), jnp.float32).value
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.eps)
    if self.affine:
      y = (y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
           + self.param("bias", nn.initializers.zeros, (c,), jnp.float32))
    return y.astype(self.dtype)


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's padding (k - 1) // 2 on every side, explicit: "SAME" pads a stride-2 3x3 conv
  (0, 1) on even inputs, which shifts the sampling grid by one pixel."""
  p = (kernel - 1) // 2
  return (p, p), (p, p)


def _conv_bn(x: jax.Array, name: str, features: int, kernel: int = 1, stride: int = 1,
             groups: int = 1, act: bool = True, dtype: Dtype = jnp.float32) -> jax.Array:
  """torchvision's Conv2dNormActivation: Sequential(conv (no bias), BN, [SiLU]) as the children
  `{name}_0`, `{name}_1` of the calling (compact) module."""
  x = layers.Conv(features, (kernel, kernel), strides=(stride, stride), padding=_pad(kernel),
                  feature_group_count=groups, use_bias=False, dtype=dtype, name=f"{name}_0")(x)
  x = BatchNorm(BN_EPS, dtype=dtype, name=f"{name}_1")(x)
  return nn.silu(x) if act else x


class SqueezeExcitation(nn.Module):
  """s = sigmoid(fc2(silu(fc1(mean_hw x)))), out = s * x; fc1/fc2 are 1x1 convs with bias.
  torchvision sizes the squeeze from the *block input*: max(1, in_channels // 4), not from the
  expanded channels the SE sees."""
  squeeze_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
    s = nn.silu(layers.Conv(self.squeeze_channels, (1, 1), dtype=self.dtype, name="fc1")(s))
    s = nn.sigmoid(layers.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="fc2")(s))
    return x * s


class MBConvBlock(nn.Module):
  """One FusedMBConv or MBConv block; children named as torchvision's `block.<k>` Sequential.

      FusedMBConv, e == 1:  block.0 = conv kxk s + BN + SiLU
      FusedMBConv, e > 1:   block.0 = conv kxk s (-> in*e) + BN + SiLU, block.1 = conv1x1 + BN
      MBConv:               [conv1x1 (-> in*e) + BN + SiLU,] depthwise kxk s + BN + SiLU,
                            SE(max(1, in // 4)), conv1x1 + BN
      out = x + f(x)  if stride == 1 and in == out  (stochastic depth: identity at eval)
  """
  fused: bool
  expand_ratio: int
  kernel: int
  stride: int
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c_in, d = x.shape[-1], self.dtype
    expanded = _make_divisible(c_in * self.expand_ratio)
    h, k = x, 0
    if self.fused:
      if expanded != c_in:
        h = _conv_bn(h, "block_0", expanded, self.kernel, self.stride, dtype=d)
        h = _conv_bn(h, "block_1", self.out_channels, act=False, dtype=d)
      else:
        h = _conv_bn(h, "block_0", self.out_channels, self.kernel, self.stride, dtype=d)
    else:
      if expanded != c_in:
        h, k = _conv_bn(h, "block_0", expanded, dtype=d), 1
      h = _conv_bn(h, f"block_{k}", expanded, self.kernel, self.stride, groups=expanded, dtype=d)
      h = SqueezeExcitation(max(1, c_in // 4), d, name=f"block_{k + 1}")(h)
      h = _conv_bn(h, f"block_{k + 2}", self.out_channels, act=False, dtype=d)
    if self.stride == 1 and c_in == self.out_channels:
      h = h + x
    return h


class EfficientNetEncoder(nn.Module):
  """Stability-AI's EfficientNetEncoder: `__call__` is its forward (input already normalised),
  `encode` adds Stage C's preprocessing. `dtype` is the compute dtype (params stay float32; every
  BatchNorm computes in float32); outputs are float32."""
  stages: tuple[Stage, ...] = STAGES
  head_channels: int = HEAD_CHANNELS
  latent_channels: int = LATENT_CHANNELS
  dtype: Dtype = jnp.float32

  def setup(self):
    d, n = self.dtype, len(self.stages)
    conv = lambda features, kernel=1, stride=1, **kw: layers.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=_pad(kernel),
        use_bias=False, dtype=d, **kw)
    self.backbone_0_0 = conv(self.stages[0].in_channels, 3, 2)     # stem
    self.backbone_0_1 = BatchNorm(BN_EPS, dtype=d)
    for i, st in enumerate(self.stages):
      for j in range(st.num_layers):
        setattr(self, f"backbone_{i + 1}_{j}", MBConvBlock(
            st.fused, st.expand_ratio, st.kernel, st.stride if j == 0 else 1, st.out_channels, d))
    setattr(self, f"backbone_{n + 1}_0", conv(self.head_channels))  # head
    setattr(self, f"backbone_{n + 1}_1", BatchNorm(BN_EPS, dtype=d))
    self.mapper_0 = conv(self.latent_channels)
    self.mapper_1 = BatchNorm(MAPPER_BN_EPS, affine=False, dtype=jnp.float32)

  def features(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, 3] ImageNet-normalised -> [B, ceil(H/32), ceil(W/32), 1280] (`backbone`)."""
    n = len(self.stages)
    x = nn.silu(self.backbone_0_1(self.backbone_0_0(x.astype(self.dtype))))
    for i, st in enumerate(self.stages):
      for j in range(st.num_layers):
        x = getattr(self, f"backbone_{i + 1}_{j}")(x)
    x = getattr(self, f"backbone_{n + 1}_1")(getattr(self, f"backbone_{n + 1}_0")(x))
    return nn.silu(x).astype(jnp.float32)

  def mapper(self, x: jax.Array) -> jax.Array:
    """[B, h, w, 1280] -> [B, h, w, 16]: conv1x1 (no bias), BatchNorm(affine=False, eps 1e-5)."""
    return self.mapper_1(self.mapper_0(x.astype(self.dtype)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """mapper(backbone(x)) for ImageNet-normalised x: Stability-AI's EfficientNetEncoder.forward."""
    return self.mapper(self.features(x))

  def encode(self, images: jax.Array, size: int | None = IMAGE_SIZE) -> jax.Array:
    """images [B, H, W, 3] in the project's [-1, 1] -> Stage C's x0 [B, 24, 24, 16] at 768 px.
    See `preprocess` for the resize; size None skips it."""
    return self(preprocess(images, size))


def resize_short_side(x: jax.Array, size: int) -> jax.Array:
  """[B, H, W, C] -> short side `size`, long side int(size * long / short) (torchvision's Resize
  rule); bilinear, antialiased when shrinking, half-pixel centres: torchvision's tensor
  `Resize(size, BILINEAR, antialias=True)`, which is torch's interpolate(align_corners=False,
  antialias=True): a triangle kernel widened by the shrink factor, weights renormalised at the
  borders (jax.image.resize does the same; tests/test_effnet.py checks it against torch to 1e-6).
  Identity when the short side is already `size` (torchvision returns the input there too).
  data/images.py's PIL bilinear uses the same filter, but on 8-bit pixels, rounded to 1/255."""
  h, w = x.shape[1:3]
  if min(h, w) == size:
    return x
  nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
  y = jax.image.resize(x.astype(jnp.float32), (x.shape[0], nh, nw, x.shape[3]), "bilinear",
                       antialias=True, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


def preprocess(images: jax.Array, size: int | None = IMAGE_SIZE) -> jax.Array:
  """[-1, 1] images -> the effnet's input, as Stability-AI's train_c.py makes it:

      x01 = (images + 1) / 2                     (its images come from ToTensor: [0, 1])
      x01 = resize_short_side(x01, 768)          (its dataset transform; bilinear, antialias)
      x   = (x01 - IMAGENET_MEAN) / IMAGENET_STD (effnet_preprocess)

  No crop: the caller gives square images (data/images.py crops; Stability-AI's SmartCrop), or
  gets a non-square grid. Resizing is linear, so resizing in [-1, 1] or [0, 1] is the same."""
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  if size is not None:
    x = resize_short_side(x, size)
  return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def images_to_latents(module: EfficientNetEncoder, variables, images: jax.Array,
                      size: int | None = IMAGE_SIZE) -> jax.Array:
  """[-1, 1] images -> x0 [B, 24, 24, 16] (float32); `variables` = {"params", "batch_stats"}.
  Jittable with `module` static."""
  return module.apply(variables, images, size, method=EfficientNetEncoder.encode)


def init_variables(module: EfficientNetEncoder, key: jax.Array) -> dict:
  """Random {"params", "batch_stats"}; wrap in jax.eval_shape for the shapes alone."""
  return module.init(key, jnp.zeros((1, 32, 32, 3), jnp.float32))


_BUFFERS = ("running_mean", "running_var")


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray],
                              module: EfficientNetEncoder | None = None, *,
                              what: str = "effnet weights") -> dict:
  """effnet_encoder.safetensors' state dict (numpy) -> {"params", "batch_stats"}, float32.

  running_mean / running_var go to "batch_stats"; num_batches_tracked (momentum=None training
  only) is dropped. Any other missing, unexpected or mis-shaped key is convert.WeightsError
  naming it (`mapper.*` included: a file without the mapper fails here, not at use).
  """
  module = module or EfficientNetEncoder()
  target = jax.eval_shape(lambda k: init_variables(module, k), jax.random.key(0))
  is_stat = lambda k: k.rsplit(".", 1)[-1] in _BUFFERS
  drop = lambda k: None if k.endswith(".num_batches_tracked") else k
  params = convert.to_flax({k: v for k, v in state_dict.items() if not is_stat(k)},
                           target["params"], what=what, rename=drop)
  stats = convert.to_flax({k: v for k, v in state_dict.items() if is_stat(k)},
                          target["batch_stats"], what=f"{what} (BatchNorm statistics)")
  return {"params": params, "batch_stats": stats}

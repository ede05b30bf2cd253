"""Stable Cascade's Stage A: the Paella VQ autoencoder (diffusers' PaellaVQModel) in Flax, NHWC.

Param paths are diffusers' state-dict keys under the naming rule of ppd_jax.weights.convert
(`up_blocks.3.channelwise.0.weight` -> `up_blocks_3/channelwise_0/kernel`); load a checkpoint with
`variables_from_state_dict`, which also reads the encoder's BatchNorm running statistics into a
"batch_stats" collection (buffers in PyTorch, so not counted as params). With f = r * 2 ** (levels
- 1) (r = up_down_scale_factor; 4 for Stable Cascade):

    encode:  x [B, H, W, in] -> pixel_unshuffle(r) -> conv1x1 -> [MixBlock, (conv4x4 s2, MixBlock)
             x (levels - 1)] -> conv1x1 (no bias) -> BatchNorm (running stats) -> h [B, H/f, W/f, C]
    decode:  h -> conv1x1 -> MixBlock x bottleneck_blocks -> [convT4x4 s2, MixBlock] x (levels - 1)
             -> conv1x1 -> pixel_shuffle(r) -> x
    quantize (only in __call__): h -> nearest codebook vector (Euclidean), straight-through

Stable Cascade's decoder pipeline never quantizes: `images = decode(scale_factor * latents)` clamped
to [0, 1] (latents_to_images). Stage B's latents are `encode(x) / scale_factor` (Stability-AI's
StageA.encode; images_to_latents).
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

LN_EPS = 1e-6   # MixingResidualBlock's two LayerNorms (no affine)
BN_EPS = 1e-5   # PyTorch BatchNorm2d's default

# StageA's argument names in Stability-AI's code (and early Würstchen configs): named in the error.
_OLD_NAMES = {"c_hidden": "embed_dim", "c_latent": "latent_channels",
              "codebook_size": "num_vq_embeddings"}


@dataclasses.dataclass(frozen=True)
class PaellaConfig:
  """PaellaVQModel's architecture and latent scale; field names and defaults follow diffusers'
  config.json (the defaults are Stable Cascade's `vqgan/config.json`)."""
  in_channels: int = 3
  out_channels: int = 3
  up_down_scale_factor: int = 2
  levels: int = 2
  bottleneck_blocks: int = 12
  embed_dim: int = 384
  latent_channels: int = 4
  num_vq_embeddings: int = 8192
  scale_factor: float = 0.3764

  def __post_init__(self):
    for field in ("in_channels", "out_channels", "up_down_scale_factor", "levels",
                  "bottleneck_blocks", "embed_dim", "latent_channels", "num_vq_embeddings"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"PaellaConfig.{field} must be a positive int, got {value!r}")
    if self.embed_dim % 2 ** (self.levels - 1):
      raise ValueError(f"PaellaConfig.embed_dim={self.embed_dim} must be divisible by "
                       f"2 ** (levels - 1) = {2 ** (self.levels - 1)}")
    if isinstance(self.scale_factor, bool) or not (isinstance(self.scale_factor, (int, float))
                                                   and self.scale_factor > 0):
      raise ValueError(f"PaellaConfig.scale_factor must be > 0, got {self.scale_factor!r}")

  @property
  def c_levels(self) -> tuple[int, ...]:
    """Channels per level, shallow to deep: embed_dim / 2 ** (levels - 1 - i)."""
    return tuple(self.embed_dim // 2 ** i for i in reversed(range(self.levels)))

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side (4 for Stable Cascade)."""
    return self.up_down_scale_factor * 2 ** (self.levels - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "PaellaConfig":
    """diffusers' vqgan/config.json (or `PaellaVQModel.config`) -> PaellaConfig.

    Keys starting with "_" are metadata and skipped; any other key this module does not know is an
    error naming it (it may change the computation).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    args = {}
    for key, value in config.items():
      if key.startswith("_"):
        continue
      if key not in fields:
        hint = f" (the old name of {_OLD_NAMES[key]!r})" if key in _OLD_NAMES else ""
        raise ValueError(f"paella (Stage A) config key {key!r} is not supported{hint}")
      args[key] = value
    return cls(**args)


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
  """[B, H r, W r, C] -> [B, H, W, C r r] in PyTorch's channel order: out[c r^2 + i r + j] is
  in[c] at row offset i, column offset j."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
  """The inverse: [B, H, W, C r r] -> [B, H r, W r, C], channel c r^2 + i r + j to offset (i, j)."""
  b, h, w, crr = x.shape
  x = x.reshape(b, h, w, crr // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * r, w * r, crr // (r * r))


def _layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm over channels without affine (two-pass variance, float32 statistics):
  (x - mean) / sqrt(var + 1e-6)."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + LN_EPS)).astype(x.dtype)


class MixingResidualBlock(nn.Module):
  """Paella's residual block, modulated by six learnt scalars g (zeros at init: the identity):

      x = x + depthwise3x3(edge_pad_1(LN(x) (1 + g0) + g1)) g2
      x = x + Linear(GELU(Linear(LN(x) (1 + g3) + g4))) g5      (widths c -> hidden -> c)

  The depthwise conv sees replicate ("edge") padding, not zeros; GELU is the exact (erf) one.
  """
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    g = self.param("gammas", nn.initializers.zeros, (6,), jnp.float32).astype(self.dtype)
    h = _layer_norm(x) * (1 + g[0]) + g[1]
    h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h = layers.Conv(c, (3, 3), padding="VALID", feature_group_count=c, dtype=self.dtype,
                    name="depthwise_1")(h)
    x = x + h * g[2]
    h = _layer_norm(x) * (1 + g[3]) + g[4]
    h = layers.Dense(self.hidden, dtype=self.dtype, name="channelwise_0")(h)
    h = layers.Dense(c, dtype=self.dtype, name="channelwise_2")(nn.gelu(h, approximate=False))
    return x + h * g[5]


class BatchNormEval(nn.Module):
  """BatchNorm2d with its running statistics (the encoder's last layer; PyTorch eval mode):
  (x - running_mean) / sqrt(running_var + 1e-5) * scale + bias, in float32."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,), jnp.float32).value
    var = self.variable("batch_stats", "running_var", jnp.ones, (c,), jnp.float32).value
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + BN_EPS) * scale + bias
    return y.astype(self.dtype)


class VectorQuantizer(nn.Module):
  """The codebook (`vquantizer.embedding.weight`, [num_vq_embeddings, latent_channels]) and the
  nearest-code lookup of diffusers' VectorQuantizer: k = argmin_j |h - e_j|, out = h + sg(e_k - h)
  (the straight-through value e_k with the gradient of h)."""
  num_embeddings: int
  dim: int

  @nn.compact
  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h [..., dim] -> (quantized [..., dim], indices [...])."""
    codebook = nn.Embed(self.num_embeddings, self.dim, name="embedding").embedding
    h32 = h.astype(jnp.float32)
    dist = (jnp.square(h32).sum(-1, keepdims=True) - 2 * h32 @ codebook.T
            + jnp.square(codebook).sum(-1))   # |h - e_j|^2, same argmin as the distance
    indices = jnp.argmin(dist, axis=-1)
    quantized = h32 + jax.lax.stop_gradient(codebook[indices] - h32)
    return quantized.astype(h.dtype), indices


def _encoder_layout(cfg: PaellaConfig) -> list[tuple[str, str, dict]]:
  """(name, kind, args) of `down_blocks` in order, named by their PyTorch index."""
  out, c = [], cfg.c_levels
  for i in range(cfg.levels):
    if i > 0:
      out.append(("conv_down", dict(features=c[i])))
    out.append(("block", dict(hidden=4 * c[i])))
  names = [(f"down_blocks_{n}", kind, args) for n, (kind, args) in enumerate(out)]
  n = len(out)   # the projection to latents: Sequential(Conv2d(bias=False), BatchNorm2d)
  return names + [(f"down_blocks_{n}_0", "to_latent", {}), (f"down_blocks_{n}_1", "bn", {})]


def _decoder_layout(cfg: PaellaConfig) -> list[tuple[str, str, dict]]:
  """(name, kind, args) of `up_blocks` in order; up_blocks.0 is Sequential(Conv2d 1x1)."""
  c, out = cfg.c_levels[::-1], []   # deep to shallow
  for i in range(cfg.levels):
    out += [("block", dict(hidden=4 * c[i]))] * (cfg.bottleneck_blocks if i == 0 else 1)
    if i < cfg.levels - 1:
      out.append(("conv_up", dict(features=c[i + 1])))
  return ([("up_blocks_0_0", "from_latent", dict(features=c[0]))]
          + [(f"up_blocks_{n + 1}", kind, args) for n, (kind, args) in enumerate(out)])


def transposed_regex(cfg: PaellaConfig) -> str:
  """convert.to_flax's `transposed=`: the decoder's ConvTranspose2d module paths."""
  return "|".join(name for name, kind, _ in _decoder_layout(cfg) if kind == "conv_up")


class PaellaVQModel(nn.Module):
  """Stage A; `dtype` is the compute dtype (params stay float32), outputs are float32.

  Call `encode` / `decode` through apply(..., method=PaellaVQModel.decode); `__call__` (the
  quantized reconstruction) touches every layer, so init creates every param and statistic.
  """
  config: PaellaConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg, dtype = self.config, self.dtype
    make = {
        "block": lambda hidden: MixingResidualBlock(hidden, dtype),
        "conv_down": lambda features: layers.Conv(features, (4, 4), strides=(2, 2),
                                                  padding=((1, 1), (1, 1)), dtype=dtype),
        "conv_up": lambda features: layers.ConvTranspose(features, 4, 2, 1, dtype=dtype),
        "to_latent": lambda: layers.Conv(cfg.latent_channels, (1, 1), use_bias=False,
                                         dtype=dtype),
        "bn": lambda: BatchNormEval(dtype),
        "from_latent": lambda features: layers.Conv(features, (1, 1), dtype=dtype),
    }
    for name, kind, args in _encoder_layout(cfg) + _decoder_layout(cfg):
      setattr(self, name, make[kind](**args))
    r2 = cfg.up_down_scale_factor ** 2
    self.in_block_1 = layers.Conv(cfg.c_levels[0], (1, 1), dtype=dtype)
    self.vquantizer = VectorQuantizer(cfg.num_vq_embeddings, cfg.latent_channels)
    self.out_block_0 = layers.Conv(cfg.out_channels * r2, (1, 1), dtype=dtype)

  def encode(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, in_channels] (Stage A's range is [0, 1]) -> pre-quantisation latents h
    [B, H/f, W/f, latent_channels] float32 (diffusers' `encode(x).latents`); H, W multiples of f."""
    cfg = self.config
    x = pixel_unshuffle(images.astype(self.dtype), cfg.up_down_scale_factor)
    x = self.in_block_1(x)
    for name, _, _ in _encoder_layout(cfg):
      x = getattr(self, name)(x)
    return x.astype(jnp.float32)

  def decode(self, latents: jax.Array) -> jax.Array:
    """h [B, h, w, latent_channels] -> [B, h f, w f, out_channels] float32, no codebook lookup
    (diffusers' `decode(h, force_not_quantize=True).sample`; not clamped)."""
    cfg = self.config
    x = latents.astype(self.dtype)
    for name, _, _ in _decoder_layout(cfg):
      x = getattr(self, name)(x)
    x = pixel_shuffle(self.out_block_0(x), cfg.up_down_scale_factor)
    return x.astype(jnp.float32)

  def quantize(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h -> (nearest codebook vectors, their indices [B, h, w])."""
    quantized, indices = self.vquantizer(latents.astype(jnp.float32))
    return quantized, indices

  def __call__(self, images: jax.Array) -> jax.Array:
    """decode(quantize(encode(x))), i.e. diffusers'
    decode(encode(x).latents, force_not_quantize=False)."""
    return self.decode(self.quantize(self.encode(images))[0])


def init_variables(module: PaellaVQModel, key: jax.Array) -> dict:
  """Random {"params", "batch_stats"} (float32); wrap in jax.eval_shape for the shapes alone
  (diffusers' weights come from variables_from_state_dict instead)."""
  f = module.config.downsample_factor
  return module.init(key, jnp.zeros((1, f, f, module.config.in_channels), jnp.float32))


_BUFFERS = ("running_mean", "running_var")


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray], module: PaellaVQModel, *,
                              what: str = "paella weights") -> dict:
  """diffusers' PaellaVQModel state dict (numpy) -> {"params": ..., "batch_stats": ...}, float32.

  BatchNorm's running_mean / running_var go to "batch_stats"; num_batches_tracked (only used by
  training with momentum=None) is dropped. Any other missing, unexpected or mis-shaped key is
  convert.WeightsError naming it.
  """
  target = jax.eval_shape(lambda k: init_variables(module, k), jax.random.key(0))
  is_stat = lambda k: k.rsplit(".", 1)[-1] in _BUFFERS
  drop = lambda k: None if k.endswith(".num_batches_tracked") else k
  params = convert.to_flax({k: v for k, v in state_dict.items() if not is_stat(k)},
                           target["params"], what=what, rename=drop,
                           transposed=transposed_regex(module.config))
  stats = convert.to_flax({k: v for k, v in state_dict.items() if is_stat(k)},
                          target["batch_stats"], what=f"{what} (BatchNorm statistics)")
  return {"params": params, "batch_stats": stats}


def latents_to_images(module: PaellaVQModel, params, latents: jax.Array) -> jax.Array:
  """Stage B's latents [B, h, w, 4] -> images [B, 4h, 4w, 3] in the project's [-1, 1], as
  StableCascadeDecoderPipeline decodes them (which outputs [0, 1]):

      images = 2 clamp(decode(scale_factor * latents), 0, 1) - 1

  `params` is the "params" collection (decoding needs no BatchNorm statistics). Jittable with
  `module` static.
  """
  h = module.config.scale_factor * latents.astype(jnp.float32)
  images01 = jnp.clip(module.apply({"params": params}, h, method=PaellaVQModel.decode), 0.0, 1.0)
  return 2.0 * images01 - 1.0


def images_to_latents(module: PaellaVQModel, variables, images: jax.Array) -> jax.Array:
  """Images in [-1, 1] -> Stage B's latents, the inverse scaling of latents_to_images (Stability-AI
  StageA.encode, which takes [0, 1] images; diffusers' pipelines never encode):

      latents = encode((images + 1) / 2) / scale_factor

  `variables` holds "params" and "batch_stats".
  """
  h = module.apply(variables, (images.astype(jnp.float32) + 1.0) / 2.0,
                   method=PaellaVQModel.encode)
  return h / module.config.scale_factor

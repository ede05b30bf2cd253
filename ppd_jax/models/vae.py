"""AutoencoderKL (the SD 1.x / 2.x / SDXL VAE) in Flax linen, NHWC.

Param paths are diffusers' state-dict keys under the naming rule of ppd_jax.weights.convert
(`encoder.mid_block.attentions.0.to_q.weight` -> `encoder/mid_block/attentions_0/to_q/kernel`), so
`convert.to_flax` loads a diffusers AutoencoderKL checkpoint as is.

    encode:  x in [-1, 1]  -> encoder -> quant_conv -> [mean | logvar]      (B, H/f, W/f, 2 C)
             posterior q(z | x) = N(mean, exp(logvar)),   f = 2 ** (len(block_out_channels) - 1)
    decode:  z -> post_quant_conv -> decoder -> image in ~[-1, 1]

The diffusion model sees scaled latents, as diffusers' pipelines make them:

    latents = (z - shift_factor) * scaling_factor,     z = latents / scaling_factor + shift_factor
"""
import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppd_jax.models import attention_kernels
from ppd_jax.models import resnet

Dtype = Any

NORM_EPS = 1e-6      # every GroupNorm of diffusers' Encoder/Decoder (resnet_eps=1e-6)
LOGVAR_RANGE = (-30.0, 20.0)   # DiagonalGaussianDistribution's clamp

_ACTIVATIONS = ("silu", "swish")   # one function: diffusers maps both names to nn.SiLU
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture and latent scaling of an AutoencoderKL; field names follow diffusers' config.json.

  The defaults are diffusers' AutoencoderKL defaults, so a config.json missing a key (older
  files) means what it means to diffusers. SD 1.x / 2.x / SDXL set block_out_channels
  (128, 256, 512, 512), four blocks of each type, layers_per_block 2, sample_size 512 (SDXL 1024)
  and scaling_factor 0.18215 (SDXL 0.13025).
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
  up_block_types: tuple[str, ...] = (_UP_BLOCK,)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, int] = 32     # pixels; informational (tiling size in diffusers)
  scaling_factor: float = 0.18215
  shift_factor: float | None = None           # None (SD, SDXL) means 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  # diffusers runs the VAE in float32 under fp16 pipelines when set; a hint for the caller's choice
  # of AutoencoderKL.dtype, no effect on the module.
  force_upcast: bool = True

  def __post_init__(self):
    if self.shift_factor is None:
      object.__setattr__(self, "shift_factor", 0.0)
    for field in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                  "norm_num_groups"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"VAEConfig.{field} must be a positive int, got {value!r}")
    channels = self.block_out_channels
    if (not isinstance(channels, tuple) or not channels
        or not all(isinstance(c, int) and c > 0 for c in channels)):
      raise ValueError(f"VAEConfig.block_out_channels must be a non-empty tuple of positive ints, "
                       f"got {channels!r}")
    for field, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
      types = getattr(self, field)
      if not isinstance(types, tuple) or len(types) != len(channels):
        raise ValueError(f"VAEConfig.{field} needs {len(channels)} entries (one per "
                         f"block_out_channels), got {types!r}")
      unsupported = sorted(set(types) - {block})
      if unsupported:
        raise ValueError(f"VAEConfig.{field}: unsupported block type(s) {unsupported}; only "
                         f"{block!r} is implemented")
    bad = [c for c in channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAEConfig.block_out_channels {bad} not divisible by "
                       f"norm_num_groups={self.norm_num_groups}")
    if self.act_fn not in _ACTIVATIONS:
      raise ValueError(f"VAEConfig.act_fn={self.act_fn!r} is not supported (only 'silu')")
    if not self.scaling_factor > 0:
      raise ValueError(f"VAEConfig.scaling_factor must be > 0, got {self.scaling_factor!r}")
    for field in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
                  "force_upcast"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"VAEConfig.{field} must be a bool, got {getattr(self, field)!r}")

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side (8 for SD): one stride-2 conv per block but the last."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
    """diffusers' vae/config.json (or `AutoencoderKL.config`) -> VAEConfig.

    Keys starting with "_" are metadata and skipped; latents_mean / latents_std must be None (a
    per-channel normalisation some other VAEs' pipelines apply, not implemented). Any other key
    this module does not know is an error naming it: it may change the computation.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    args = {}
    for key, value in config.items():
      if key.startswith("_"):
        continue
      if key in _MUST_BE_NONE:
        if value is not None:
          raise ValueError(f"vae config {key}={value!r} is not supported (only None)")
        continue
      if key not in fields:
        raise ValueError(f"vae config key {key!r} is not supported")
      args[key] = tuple(value) if isinstance(value, list) else value
    return cls(**args)


_MUST_BE_NONE = ("latents_mean", "latents_std")


def _group_norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  return resnet.group_norm(groups, NORM_EPS, dtype, name)


class VAEAttention(nn.Module):
  """The mid block's self-attention: one head of all C channels over the H*W tokens, with bias.

      h   = group_norm(x) as [B, HW, C]
      out = x + to_out_0( softmax(q k^T / sqrt(C)) v ),   q, k, v = to_q(h), to_k(h), to_v(h)

  diffusers builds it with attention_head_dim = C (heads = 1) and rescale_output_factor 1.
  Logits and softmax are float32 whatever the input dtype. The kernel is the UNet's choice
  (attention_kernels.py): the full logits are B x (HW)^2 x 4 bytes, 1 GiB per image at SDXL's
  128 x 128 latents, so "auto" takes query chunks (or a fused kernel) instead of XLA's.
  """
  groups: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None      # attention_kernels.IMPLEMENTATIONS; None: "auto"
  logits_budget_bytes: int = attention_kernels.DEFAULT_LOGITS_BUDGET_BYTES

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, hgt * wid, 1, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    out = attention_kernels.attention_in_mesh(
        dense("to_q")(h), dense("to_k")(h), dense("to_v")(h),
        implementation=self.implementation or "auto", logits_budget_bytes=self.logits_budget_bytes)
    out = dense("to_out_0")(out.reshape(b, hgt * wid, c)).reshape(b, hgt, wid, c)
    return x + out


class MidBlock(nn.Module):
  """diffusers' UNetMidBlock2D without time embedding: resnet, [attention], resnet."""
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  logits_budget_bytes: int = attention_kernels.DEFAULT_LOGITS_BUDGET_BYTES

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    block = lambda i: resnet.ResnetBlock2D(c, self.groups, NORM_EPS, dtype=self.dtype,
                                           name=f"resnets_{i}")
    x = block(0)(x)
    if self.add_attention:
      x = VAEAttention(self.groups, self.dtype, self.attention_impl, self.logits_budget_bytes,
                       name="attentions_0")(x)
    return block(1)(x)


def _resnets(block: nn.Module, x: jax.Array) -> jax.Array:
  """A block's `num_layers` time-free ResnetBlock2Ds, named resnets_i (called inside its compact)."""
  for i in range(block.num_layers):
    x = resnet.ResnetBlock2D(block.out_channels, block.groups, NORM_EPS, dtype=block.dtype,
                             name=f"resnets_{i}", parent=block)(x)
  return x


class DownEncoderBlock2D(nn.Module):
  """`num_layers` resnets, then a stride-2 conv padded (0, 1) bottom/right unless last."""
  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _resnets(self, x)
    if self.add_downsample:
      x = resnet.Downsample2D(self.out_channels, self.dtype, padding=0, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """`num_layers` resnets (layers_per_block + 1), then nearest x2 upsample + conv unless last."""
  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _resnets(self, x)
    if self.add_upsample:
      x = resnet.Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """conv_in, down blocks, mid block, GroupNorm + SiLU, conv_out to 2 * latent_channels moments."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  logits_budget_bytes: int = attention_kernels.DEFAULT_LOGITS_BUDGET_BYTES

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dtype = self.config, self.dtype
    channels = cfg.block_out_channels
    x = resnet.conv3x3(channels[0], dtype, "conv_in")(x.astype(dtype))
    for i, ch in enumerate(channels):
      x = DownEncoderBlock2D(ch, cfg.layers_per_block, cfg.norm_num_groups,
                             add_downsample=i < len(channels) - 1, dtype=dtype,
                             name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, dtype, self.attention_impl,
                 self.logits_budget_bytes, name="mid_block")(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, dtype, "conv_norm_out")(x))
    return resnet.conv3x3(2 * cfg.latent_channels, dtype, "conv_out")(x)


class Decoder(nn.Module):
  """conv_in, mid block, up blocks (channels reversed), GroupNorm + SiLU, conv_out to RGB."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  logits_budget_bytes: int = attention_kernels.DEFAULT_LOGITS_BUDGET_BYTES

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, dtype = self.config, self.dtype
    channels = tuple(reversed(cfg.block_out_channels))
    x = resnet.conv3x3(channels[0], dtype, "conv_in")(z.astype(dtype))
    x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, dtype, self.attention_impl,
                 self.logits_budget_bytes, name="mid_block")(x)
    for i, ch in enumerate(channels):
      x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, cfg.norm_num_groups,
                           add_upsample=i < len(channels) - 1, dtype=dtype,
                           name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(cfg.norm_num_groups, dtype, "conv_norm_out")(x))
    return resnet.conv3x3(cfg.out_channels, dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder; `dtype` is the compute dtype (params stay float32), outputs are float32.

  Call `encode` / `decode` through apply(..., method=AutoencoderKL.encode); `__call__`
  (x -> decode(mean)) exists so that init creates every param. attention_impl and
  logits_budget_bytes pick the mid blocks' attention kernel as config.model.attention_impl does
  the UNet's (attention_kernels.attention); they change memory, not params or results.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None          # None or "": "auto"
  logits_budget_bytes: int = attention_kernels.DEFAULT_LOGITS_BUDGET_BYTES

  def setup(self):
    cfg = self.config
    attn = dict(attention_impl=self.attention_impl, logits_budget_bytes=self.logits_budget_bytes)
    self.encoder = Encoder(cfg, self.dtype, **attn)
    self.decoder = Decoder(cfg, self.dtype, **attn)
    if cfg.use_quant_conv:
      self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, C] float32.

    logvar is clipped to [-30, 20], as diffusers' DiagonalGaussianDistribution stores it.
    """
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents z [B, h, w, C] -> images [B, h*f, w*f, out_channels] float32 (~[-1, 1])."""
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images)[0])


def init_params(module: AutoencoderKL, key: jax.Array, image_size: int | None = None) -> dict:
  """Random float32 params (diffusers' weights come from convert.to_flax instead).

  image_size defaults to the smallest input (one latent pixel): the param shapes do not depend
  on it. Wrap in jax.eval_shape for the shapes alone.
  """
  size = image_size or module.config.downsample_factor
  images = jnp.zeros((1, size, size, module.config.in_channels), jnp.float32)
  return module.init(key, images)["params"]


def images_to_latents(module: AutoencoderKL, params, images: jax.Array,
                      key: jax.Array | None = None) -> jax.Array:
  """images in [-1, 1] -> the diffusion model's latents, as diffusers' pipelines make them.

      z       = mean                                      key None (the posterior mode)
      z       = mean + exp(0.5 logvar) * eps,  eps ~ N(0, I) from key   (a posterior sample)
      latents = (z - shift_factor) * scaling_factor

  Jittable with `module` static.
  """
  mean, logvar = module.apply({"params": params}, images, method=AutoencoderKL.encode)
  z = mean
  if key is not None:
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    z = mean + jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE)) * eps
  cfg = module.config
  return (z - cfg.shift_factor) * cfg.scaling_factor


def latents_to_images(module: AutoencoderKL, params, latents: jax.Array) -> jax.Array:
  """The inverse scaling, then decode:  images = decode(latents / scaling_factor + shift_factor)."""
  cfg = module.config
  z = latents.astype(jnp.float32) / cfg.scaling_factor + cfg.shift_factor
  return module.apply({"params": params}, z, method=AutoencoderKL.decode)


# Attention key names of diffusers' pre-0.14 AttentionBlock, still in some published VAE
# checkpoints (diffusers renames them on load: ModelMixin._fix_state_dict_keys_on_load).
_LEGACY_ATTENTION = re.compile(r"(mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_WEIGHT = re.compile(r"mid_block\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def rename_legacy_vae_key(key: str) -> str:
  """`...mid_block.attentions.0.query.weight` -> `...mid_block.attentions.0.to_q.weight`, and key
  -> to_k, value -> to_v, proj_attn -> to_out.0; any other key unchanged. Pass as
  convert.to_flax(..., rename=rename_legacy_vae_key)."""
  return _LEGACY_ATTENTION.sub(lambda m: f"{m.group(1)}.{_LEGACY_NAMES[m.group(2)]}.", key)


def legacy_vae_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renamed keys (rename_legacy_vae_key), and attention weights stored 1x1-conv-shaped
  ([C, C, 1, 1] or [C, C, 1], as LDM-converted files may have them) reshaped to Linear [C, C],
  which is what diffusers' conv_attn_to_linear does. Already-current dicts pass through."""
  out = {}
  for key, value in state_dict.items():
    key = rename_legacy_vae_key(key)
    value = np.asarray(value)
    if _ATTENTION_WEIGHT.search(key) and value.ndim > 2:
      if any(d != 1 for d in value.shape[2:]):
        raise ValueError(f"{key}: attention weight of shape {value.shape} is not 1x1-conv-shaped")
      value = value.reshape(value.shape[:2])
    out[key] = value
  return out

"""UNet2DConditionModel in Flax linen (NHWC), with the PPD user branch in every cross-attention.

Parameter paths are diffusers' PyTorch state-dict keys with list indices joined by "_"
(`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight` ->
`down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel`), so a converter maps keys 1:1.

Config quirk kept on purpose: diffusers' `attention_head_dim` is the NUMBER OF HEADS of each block
(`num_attention_heads = num_attention_heads or attention_head_dim`, diffusers issue #2011), and the
per-head dim is channels // heads. SD 1.5's 8 gives 8 heads of 40, 80, 160 channels; SD 2.x's
(5, 10, 20, 20) gives heads of 64. Mirroring it lets diffusers' config.json values be used as is.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppd_jax.models import attention
from ppd_jax.models import embeddings
from ppd_jax.models import resnet

Dtype = Any
IntOrTuple = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of the UNet and of the user branch. Field names follow diffusers' config.json."""
  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: IntOrTuple = 2
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  attention_head_dim: IntOrTuple = 8          # heads per block (diffusers' naming, see above)
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  transformer_layers_per_block: IntOrTuple = 1
  use_linear_projection: bool = False
  # SDXL's micro-conditioning ("text_time"): the pooled text embedding and 6 size/crop numbers.
  addition_embed_type: str | None = None
  addition_time_embed_dim: int = 256
  projection_class_embeddings_input_dim: int = 2816
  # SD 2.x sets upcast_attention: attention logits and softmax in float32. jax.nn.dot_product_
  # attention always accumulates logits in float32 and takes the softmax in float32 (XLA and
  # cuDNN alike), so every model here already runs as upcast; the field is kept for config parity.
  upcast_attention: bool = False
  user_embed_dim: int = 3584
  user_tokens: int = 1
  user_tokens_per_embedding: int = 4          # K tokens from a one-token embedding (projector)
  dtype: Dtype = jnp.float32                  # compute dtype; params are always float32
  remat: bool = False                         # nn.remat around ResnetBlock2D, BasicTransformerBlock
  attention_impl: str | None = None           # attention_kernels.IMPLEMENTATIONS; None: "auto"

  def __post_init__(self):
    n = len(self.block_out_channels)
    for field in ("down_block_types", "up_block_types"):
      if len(getattr(self, field)) != n:
        raise ValueError(f"UNetConfig.{field} needs {n} entries (one per block_out_channels)")
    for field in ("layers_per_block", "attention_head_dim", "transformer_layers_per_block"):
      value = getattr(self, field)
      if not isinstance(value, int) and (len(value) != n or
                                         not all(isinstance(v, int) for v in value)):
        raise ValueError(f"UNetConfig.{field} must be an int or {n} ints, got {value!r}")
    if self.addition_embed_type not in (None, "text_time"):
      raise ValueError(f"UNetConfig.addition_embed_type={self.addition_embed_type!r}: only None "
                       "and 'text_time' (SDXL) are supported")
    unknown = (set(self.down_block_types) - set(DOWN_BLOCKS)) | (
        set(self.up_block_types) - set(UP_BLOCKS))
    if unknown:
      raise ValueError(f"UNetConfig: unsupported block types {sorted(unknown)}")
    for ch, heads in zip(self.block_out_channels, self.per_block("attention_head_dim")):
      if ch % self.norm_num_groups or ch % heads:
        raise ValueError(f"UNetConfig: {ch} channels must be divisible by norm_num_groups="
                         f"{self.norm_num_groups} and by the block's {heads} heads")

  def per_block(self, field: str) -> tuple[int, ...]:
    """An int-or-tuple field as one value per down block."""
    value = getattr(self, field)
    return (value,) * len(self.block_out_channels) if isinstance(value, int) else tuple(value)


# diffusers' UNet2DConditionModel config keys that change the computation, and the one value of each
# that this UNet implements (the value every SD 1.x / 2.x / SDXL checkpoint has).
_FIXED_DIFFUSERS_VALUES = {
    "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "attention_type": "default", "dropout": 0.0,
    "reverse_transformer_layers_per_block": None, "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}
# Keys that exist in diffusers' configs and are either mapped below or change nothing here.
_IGNORED_DIFFUSERS_KEYS = {"addition_embed_type_num_heads", "num_attention_heads",
                           "attention_head_dim"}


def config_from_diffusers(unet_config: dict, **overrides) -> "UNetConfig":
  """diffusers' unet/config.json -> UNetConfig; `overrides` sets ours (user_embed_dim, dtype, ...).

  Any computation-changing field at a value this UNet does not implement is an error naming it.
  Heads: diffusers takes `num_attention_heads or attention_head_dim` as the head count.
  """
  fields = set(UNetConfig.__dataclass_fields__)
  args = {}
  for key, value in unet_config.items():
    if key.startswith("_") or key in _IGNORED_DIFFUSERS_KEYS:
      continue
    if key in _FIXED_DIFFUSERS_VALUES:
      if value != _FIXED_DIFFUSERS_VALUES[key]:
        raise ValueError(f"unet config {key}={value!r} is not supported (only "
                         f"{_FIXED_DIFFUSERS_VALUES[key]!r})")
      continue
    if key in fields:
      args[key] = tuple(value) if isinstance(value, list) else value
  heads = unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim", 8)
  args["attention_head_dim"] = tuple(heads) if isinstance(heads, list) else heads
  args.update(overrides)
  return UNetConfig(**args)


def _maybe_remat(cls, remat: bool):
  return nn.remat(cls) if remat else cls


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """What every block of one UNet shares."""
  groups: int
  eps: float
  use_linear_projection: bool
  dtype: Dtype
  remat: bool
  attention_impl: str | None

  def resnet(self, out_channels: int, name: str) -> nn.Module:
    cls = _maybe_remat(resnet.ResnetBlock2D, self.remat)
    return cls(out_channels, self.groups, self.eps, dtype=self.dtype, name=name)

  def transformer(self, heads: int, num_layers: int, name: str) -> nn.Module:
    return attention.Transformer2DModel(heads, num_layers, self.groups, self.use_linear_projection,
                                        self.dtype, self.remat, self.attention_impl, name=name)


class DownBlock2D(nn.Module):
  """`num_layers` resnets, then an optional stride-2 downsample; returns every output as a skip."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  s: BlockSettings
  heads: int = 0                 # unused: the same constructor as CrossAttnDownBlock2D
  transformer_layers: int = 1    # unused

  has_attention = False

  @nn.compact
  def __call__(self, x, temb, context, user_tokens, user_scale):
    skips = []
    for i in range(self.num_layers):
      x = self.s.resnet(self.out_channels, f"resnets_{i}")(x, temb)
      if self.has_attention:
        x = self.s.transformer(self.heads, self.transformer_layers, f"attentions_{i}")(
            x, context, user_tokens, user_scale)
      skips.append(x)
    if self.add_downsample:
      x = resnet.Downsample2D(self.out_channels, self.s.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class CrossAttnDownBlock2D(DownBlock2D):
  """DownBlock2D with a Transformer2DModel after each resnet."""
  has_attention = True


class UpBlock2D(nn.Module):
  """`num_layers` resnets, each on concat(x, the last unused skip), then an optional upsample."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  s: BlockSettings
  heads: int = 0
  transformer_layers: int = 1

  has_attention = False

  @nn.compact
  def __call__(self, x, skips, temb, context, user_tokens, user_scale):
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = self.s.resnet(self.out_channels, f"resnets_{i}")(x, temb)
      if self.has_attention:
        x = self.s.transformer(self.heads, self.transformer_layers, f"attentions_{i}")(
            x, context, user_tokens, user_scale)
    if self.add_upsample:
      x = resnet.Upsample2D(self.out_channels, self.s.dtype, name="upsamplers_0")(x)
    return x


class CrossAttnUpBlock2D(UpBlock2D):
  """UpBlock2D with a Transformer2DModel after each resnet."""
  has_attention = True


class UNetMidBlock2DCrossAttn(nn.Module):
  """resnets_0, then (attentions_i, resnets_{i+1}) pairs; channels unchanged."""
  heads: int
  transformer_layers: int
  s: BlockSettings
  num_layers: int = 1

  @nn.compact
  def __call__(self, x, temb, context, user_tokens, user_scale):
    ch = x.shape[-1]
    x = self.s.resnet(ch, "resnets_0")(x, temb)
    for i in range(self.num_layers):
      x = self.s.transformer(self.heads, self.transformer_layers, f"attentions_{i}")(
          x, context, user_tokens, user_scale)
      x = self.s.resnet(ch, f"resnets_{i + 1}")(x, temb)
    return x


DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}


class UNet2DConditionModel(nn.Module):
  """eps/v-prediction UNet: [B, H, W, C_in], t, text (, user tokens) -> [B, H, W, C_out] float32."""
  config: UNetConfig

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               user_tokens: jax.Array | None = None,
               user_scale: attention.Scale = 1.0,
               added_cond: dict | None = None) -> jax.Array:
    """added_cond: SDXL's {"text_embeds": [B, P] pooled text, "time_ids": [B, 6]}, else None."""
    cfg = self.config
    dtype = cfg.dtype
    channels = cfg.block_out_channels
    n = len(channels)
    if sample.shape[1] % 2 ** (n - 1) or sample.shape[2] % 2 ** (n - 1):
      raise ValueError(f"UNet: H, W = {sample.shape[1:3]} must be divisible by {2 ** (n - 1)}")
    s = BlockSettings(cfg.norm_num_groups, cfg.norm_eps, cfg.use_linear_projection, dtype,
                      cfg.remat, cfg.attention_impl)
    heads = cfg.per_block("attention_head_dim")
    layers = cfg.per_block("layers_per_block")
    t_layers = cfg.per_block("transformer_layers_per_block")
    context = encoder_hidden_states.astype(dtype)
    if user_tokens is not None:
      user_tokens = user_tokens.astype(dtype)

    # Time: sinusoid of width C0 (flip_sin_to_cos=True, freq_shift=0), MLP to 4 C0.
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), sample.shape[:1])
    t_emb = embeddings.timestep_embedding(timesteps, channels[0]).astype(dtype)
    temb = embeddings.TimestepEmbedding(4 * channels[0], dtype, name="time_embedding")(t_emb)
    if cfg.addition_embed_type == "text_time":
      temb = temb + self._text_time_embedding(added_cond, sample.shape[0])

    x = resnet.conv3x3(channels[0], dtype, "conv_in")(sample.astype(dtype))
    skips = [x]
    for i, block_type in enumerate(cfg.down_block_types):
      block = DOWN_BLOCKS[block_type](channels[i], layers[i], i < n - 1, s, heads[i], t_layers[i],
                                      name=f"down_blocks_{i}")
      x, block_skips = block(x, temb, context, user_tokens, user_scale)
      skips.extend(block_skips)

    x = UNetMidBlock2DCrossAttn(heads[-1], t_layers[-1], s, name="mid_block")(
        x, temb, context, user_tokens, user_scale)

    for i, block_type in enumerate(cfg.up_block_types):
      j = n - 1 - i   # the matching down block
      num_layers = layers[j] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      block = UP_BLOCKS[block_type](channels[j], num_layers, i < n - 1, s, heads[j], t_layers[j],
                                    name=f"up_blocks_{i}")
      x = block(x, block_skips, temb, context, user_tokens, user_scale)

    x = nn.silu(resnet.group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype, "conv_norm_out")(x))
    x = resnet.conv3x3(cfg.out_channels, dtype, "conv_out")(x)
    return x.astype(jnp.float32)

  def _text_time_embedding(self, added_cond: dict | None, batch: int) -> jax.Array:
    """SDXL: add_embedding(concat(pooled text, sinusoid(time_ids) flattened)), added to temb.

        e = [text_embeds, emb(t_1), ..., emb(t_6)]    emb: width addition_time_embed_dim
    """
    cfg = self.config
    if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
      raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs added_cond="
                       "{'text_embeds': [B, P], 'time_ids': [B, 6]}")
    time_ids = jnp.broadcast_to(jnp.asarray(added_cond["time_ids"], jnp.float32), (batch, 6))
    time_emb = embeddings.timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim)
    pooled = jnp.broadcast_to(added_cond["text_embeds"].astype(jnp.float32),
                              (batch, added_cond["text_embeds"].shape[-1]))
    e = jnp.concatenate([pooled, time_emb.reshape(batch, -1)], axis=-1)
    if e.shape[-1] != cfg.projection_class_embeddings_input_dim:
      raise ValueError(f"SDXL add embedding: pooled text ({pooled.shape[-1]}) + 6 x "
                       f"{cfg.addition_time_embed_dim} = {e.shape[-1]} inputs, but "
                       f"projection_class_embeddings_input_dim="
                       f"{cfg.projection_class_embeddings_input_dim}")
    return embeddings.TimestepEmbedding(4 * cfg.block_out_channels[0], cfg.dtype,
                                        name="add_embedding")(e.astype(cfg.dtype))

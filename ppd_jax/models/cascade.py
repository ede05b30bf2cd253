"""Stable Cascade's StableCascadeUNet (Stage C, the prior, and Stage B, the decoder) in Flax, NHWC.

One class for both stages, as diffusers has it; the config decides (diffusers 0.27+ field names):

    r_embed = [emb(r), emb(0) per timestep condition]             (sca / crp are always zero)
    clip    = LN([clip_txt_mapper(text); pooled_mapper(pooled) as clip_seq tokens; img_mapper(img)])
    x = LN(conv1x1(pixel_unshuffle(sample)))
    Stage B: x += effnet_mapper(resize(effnet)) + resize(pixels_mapper(zeros [B, 8, 8, 3]))
    down: per level [downscaler], blocks (x repeats, 1x1 repeat mappers in between) -> skips
    up:   deepest first; the first ResBlock of a level takes its skip (x resized to it if needed)
    out = pixel_shuffle(conv1x1(LN(x)))

Parameter paths are diffusers' state-dict keys with indices joined by "_" (weights/convert.py),
e.g. `down_blocks.1.5.attention.to_out.0.weight` -> `down_blocks_1_5/attention/to_out_0/kernel`;
Stage B's ConvTranspose2d upscalers convert with `transposed=TRANSPOSED`.

Dropout is ignored: the model is always deterministic, since the DPO policy and its reference must
both run without it (the checkpoints carry dropout 0.1, a training-mode policy would bias the loss).
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppd_jax.models import attention
from ppd_jax.models import cascade_blocks as blocks
from ppd_jax.models import cascade_ops as ops
from ppd_jax.models import layers

Dtype = Any
R, T, A = blocks.RES, blocks.TIMESTEP, blocks.ATTN
TRANSPOSED = r"(?:.*/)?up_upscalers_\d+_1"   # Stage B's ConvTranspose2d kernels (convert.to_flax)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_CONDS = ("sca", "crp")


def _hub(c, c_cond, channels, heads, down, up, up_repeat, types, clip, effnet, dropout, conds,
         switch_level):
  """A diffusers config.json dict (hub folders diffusers/stable-cascade-configs and
  stabilityai/stable-cascade{,-prior}, 0.27 format)."""
  return dict(_class_name="StableCascadeUNet", _diffusers_version="0.27.0", in_channels=c,
              out_channels=c, timestep_ratio_embedding_dim=64, patch_size=1 if c == 16 else 2,
              conditioning_dim=c_cond, block_out_channels=channels, num_attention_heads=heads,
              down_num_layers_per_block=down, up_num_layers_per_block=up,
              down_blocks_repeat_mappers=[1] * len(channels), up_blocks_repeat_mappers=up_repeat,
              block_types_per_layer=types, clip_text_in_channels=clip[0],
              clip_text_pooled_in_channels=clip[1], clip_image_in_channels=clip[2], clip_seq=4,
              effnet_in_channels=effnet[0], pixel_mapper_in_channels=effnet[1], kernel_size=3,
              dropout=dropout, self_attn=True, timestep_conditioning_type=conds,
              switch_level=switch_level)


_RTA, _RT = [R, T, A], [R, T]
PRIOR = _hub(16, 2048, [2048, 2048], [32, 32], [8, 24], [24, 8], [1, 1], [_RTA, _RTA],
             (1280, 1280, 768), (None, None), [0.1, 0.1], ["sca", "crp"], [False])
PRIOR_LITE = _hub(16, 1536, [1536, 1536], [24, 24], [4, 12], [12, 4], [1, 1], [_RTA, _RTA],
                  (1280, 1280, 768), (None, None), [0.1, 0.1], ["sca", "crp"], [False])
DECODER = _hub(4, 1280, [320, 640, 1280, 1280], [0, 0, 20, 20], [2, 6, 28, 6], [6, 28, 6, 2],
               [3, 3, 2, 2], [_RT, _RT, _RTA, _RTA], (None, 1280, None), (16, 3),
               [0, 0, 0.1, 0.1], ["sca"], None)
DECODER_LITE = _hub(4, 1280, [320, 576, 1152, 1152], [0, 9, 18, 18], [2, 4, 14, 4],
                    [4, 14, 4, 2], [2, 2, 2, 2], [_RT, _RT, _RTA, _RTA], (None, 1280, None),
                    (16, 3), [0, 0, 0.1, 0.1], ["sca"], None)


def _tuple(v):
  return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class CascadeConfig:
  """StableCascadeUNet's architecture (diffusers' names and defaults), then ours: the user branch,
  the compute dtype (params stay float32), remat per block and the attention kernel.
  `dropout` is accepted and ignored: the model is always deterministic."""
  in_channels: int = 16
  out_channels: int = 16
  timestep_ratio_embedding_dim: int = 64
  patch_size: int = 1
  conditioning_dim: int = 2048
  block_out_channels: tuple[int, ...] = (2048, 2048)
  num_attention_heads: tuple[int, ...] = (32, 32)
  down_num_layers_per_block: tuple[int, ...] = (8, 24)
  up_num_layers_per_block: tuple[int, ...] = (24, 8)      # in up order: deepest level first
  down_blocks_repeat_mappers: tuple[int, ...] = (1, 1)
  up_blocks_repeat_mappers: tuple[int, ...] = (1, 1)      # in up order
  block_types_per_layer: tuple[tuple[str, ...], ...] = ((R, T, A), (R, T, A))
  clip_text_in_channels: int | None = None
  clip_text_pooled_in_channels: int = 1280
  clip_image_in_channels: int | None = None
  clip_seq: int = 4
  effnet_in_channels: int | None = None
  pixel_mapper_in_channels: int | None = None
  kernel_size: int = 3
  dropout: float | tuple[float, ...] = (0.1, 0.1)        # ignored (deterministic)
  self_attn: bool | tuple[bool, ...] = True
  timestep_conditioning_type: tuple[str, ...] = _CONDS
  switch_level: tuple[bool, ...] | None = None            # None: Stage B's k2 s2 (de)convs
  user_embed_dim: int = 3584
  user_tokens: int = 1
  user_tokens_per_embedding: int = 4
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: str | None = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
    if isinstance(self.dtype, str):
      if self.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
      object.__setattr__(self, "dtype", _DTYPES[self.dtype])
    _validate(self)

  def levels_self_attn(self) -> tuple[bool, ...]:
    n = len(self.block_out_channels)
    return (self.self_attn,) * n if isinstance(self.self_attn, bool) else self.self_attn


def _validate(c: CascadeConfig) -> None:
  """What diffusers' StableCascadeUNet builds and runs, minus what no checkpoint uses."""
  n = len(c.block_out_channels)
  def need(ok, msg):
    if not ok:
      raise ValueError(f"CascadeConfig: {msg}")
  for name in ("num_attention_heads", "down_num_layers_per_block", "up_num_layers_per_block",
               "down_blocks_repeat_mappers", "up_blocks_repeat_mappers", "block_types_per_layer"):
    value = getattr(c, name)
    need(value is not None and len(value) == n, f"{name} needs {n} entries, got {value}")
  need(all(r >= 1 for r in c.down_blocks_repeat_mappers + c.up_blocks_repeat_mappers),
       "repeat mappers must be >= 1")
  for lvl, types in enumerate(c.block_types_per_layer):
    need(types and set(types) <= {R, T, A}, f"block types {types} (only {R}, {T}, {A})")
    if A in types:
      ch, heads = c.block_out_channels[lvl], c.num_attention_heads[lvl]
      need(heads > 0 and ch % heads == 0, f"level {lvl}: {ch} channels, {heads} heads")
  need(isinstance(c.self_attn, bool) or len(c.self_attn) == n, f"self_attn needs {n} entries")
  need(set(c.timestep_conditioning_type) <= set(_CONDS),
       f"timestep_conditioning_type {c.timestep_conditioning_type} (only {_CONDS})")
  need(c.switch_level is None or (len(c.switch_level) >= n - 1 and not any(c.switch_level)),
       f"switch_level {c.switch_level}: only None (Stage B) or all False (Stage C); True "
       "(bilinear up/down between levels) is in no published checkpoint")
  need((c.clip_text_in_channels is None) == (c.clip_image_in_channels is None),
       "clip_text_in_channels and clip_image_in_channels go together (diffusers uses the text "
       "only with the image tokens)")
  need(c.pixel_mapper_in_channels in (None, 3), "pixel_mapper_in_channels must be 3 or None "
       "(diffusers feeds it 3-channel zeros)")
  need(c.kernel_size % 2 == 1, f"kernel_size {c.kernel_size} must be odd")
  need(c.timestep_ratio_embedding_dim >= 4, "timestep_ratio_embedding_dim must be >= 4")
  need(c.patch_size >= 1, "patch_size must be >= 1")


_DIFFUSERS_FIELDS = ("in_channels", "out_channels", "timestep_ratio_embedding_dim", "patch_size",
                     "conditioning_dim", "block_out_channels", "num_attention_heads",
                     "down_num_layers_per_block", "up_num_layers_per_block",
                     "down_blocks_repeat_mappers", "up_blocks_repeat_mappers",
                     "block_types_per_layer", "clip_text_in_channels",
                     "clip_text_pooled_in_channels", "clip_image_in_channels", "clip_seq",
                     "effnet_in_channels", "pixel_mapper_in_channels", "kernel_size", "dropout",
                     "self_attn", "timestep_conditioning_type", "switch_level")
_OLD_FORMAT = ("c_in", "c_out", "c_r", "c_hidden", "c_cond", "c_clip_text", "c_clip_text_pooled",
               "c_clip_img", "c_clip_seq", "c_effnet", "c_pixels", "nhead", "blocks",
               "block_repeat", "level_config", "t_conds")


def config_from_diffusers(config: Mapping[str, Any], **overrides) -> CascadeConfig:
  """A diffusers StableCascadeUNet config.json dict -> CascadeConfig; `overrides` sets our fields
  (user_embed_dim, dtype, remat, ...). Missing keys take diffusers' defaults.

  Refused: the 0.26 format (`_class_name` "StableCascadeUnet", original names such as c_hidden,
  level_config, blocks: early hub revisions), other classes, unknown keys, unsupported values."""
  old = [k for k in _OLD_FORMAT if k in config]
  if config.get("_class_name") == "StableCascadeUnet" or old:
    raise ValueError(
        f"this StableCascadeUNet config is in the diffusers 0.26 format "
        f"({config.get('_class_name')}, keys {old}); use a hub revision whose config is in the "
        "0.27+ format (field names such as block_out_channels, block_types_per_layer)")
  if config.get("_class_name", "StableCascadeUNet") != "StableCascadeUNet":
    raise ValueError(f"not a StableCascadeUNet config: _class_name {config['_class_name']!r}")
  unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_FIELDS)
  if unknown:
    raise ValueError(f"StableCascadeUNet config keys not supported: {unknown}")
  ours = set(CascadeConfig.__dataclass_fields__) - set(_DIFFUSERS_FIELDS)
  if set(overrides) - ours:
    raise ValueError(f"overrides {sorted(set(overrides) - ours)}: only {sorted(ours)}")
  fields = {k: v for k, v in config.items() if k in _DIFFUSERS_FIELDS}
  return CascadeConfig(**fields, **overrides)


def num_downscales(cfg: CascadeConfig) -> int:
  """Stride-2 downscalers between levels: none in Stage C (1x1 convs), L - 1 in Stage B."""
  return 0 if cfg.switch_level is not None else len(cfg.block_out_channels) - 1


def block_kinds(cfg: CascadeConfig, level: int, layers_n: int) -> list[str]:
  """The block types of one level's ModuleList, in order: block_types_per_layer[level] repeated
  layers_n times (diffusers' down_blocks.<i>.<j> / up_blocks.<u>.<j>)."""
  types = cfg.block_types_per_layer[level]
  return [types[j % len(types)] for j in range(layers_n * len(types))]


def attention_blocks(cfg: CascadeConfig) -> list[tuple[str, int]]:
  """(block name, channels) of every SDCascadeAttnBlock in the order diffusers registers them:
  down levels 0..n-1, then up levels deepest first; names as params (`down_blocks_1_5`)."""
  n, out = len(cfg.block_out_channels), []
  for prefix, layers_per_level in (("down_blocks", cfg.down_num_layers_per_block),
                                   ("up_blocks", cfg.up_num_layers_per_block)):
    for u, layers_n in enumerate(layers_per_level):
      level = u if prefix == "down_blocks" else n - 1 - u
      for j, kind in enumerate(block_kinds(cfg, level, layers_n)):
        if kind == A:
          out.append((f"{prefix}_{u}_{j}", cfg.block_out_channels[level]))
  return out


def example_inputs(cfg: CascadeConfig, batch: int = 1) -> dict:
  """The smallest valid inputs (params do not depend on sizes): for eval_shape and init."""
  side = cfg.patch_size * 2 ** num_downscales(cfg)
  z = lambda *shape: jnp.zeros((batch,) + shape, jnp.float32)
  out = dict(sample=z(side, side, cfg.in_channels), timestep_ratio=z(),
             clip_text_pooled=z(1, cfg.clip_text_pooled_in_channels))
  if cfg.clip_text_in_channels is not None:
    out.update(clip_text=z(1, cfg.clip_text_in_channels), clip_img=z(1, cfg.clip_image_in_channels))
  if cfg.effnet_in_channels is not None:
    out["effnet"] = z(1, 1, cfg.effnet_in_channels)
  return out


class StableCascadeUNet(nn.Module):
  """[B, H, W, C_in], r [B], pooled [B, N, P] (, text [B, L, T], img [B, M, I], effnet
  [B, h, w, E]), user tokens [B, U, conditioning_dim] -> [B, H, W, C_out] float32."""
  config: CascadeConfig

  def _block(self, kind: str, level: int, name: str) -> nn.Module:
    c = self.config
    cls = {R: blocks.ResBlock, T: blocks.TimestepBlock, A: blocks.AttnBlock}[kind]
    cls = nn.remat(cls) if c.remat else cls
    if kind == R:
      return cls(c.kernel_size, c.dtype, name=name)
    if kind == T:
      return cls(c.timestep_conditioning_type, c.dtype, name=name)
    return cls(c.num_attention_heads[level], c.levels_self_attn()[level], c.dtype,
               c.attention_impl, name=name)

  def _level(self, prefix: str, level: int, layers_n: int):
    kinds = block_kinds(self.config, level, layers_n)
    return [(k, self._block(k, level, f"{prefix}_{j}")) for j, k in enumerate(kinds)]

  @nn.compact
  def __call__(self, sample: jax.Array, timestep_ratio: jax.Array, clip_text_pooled: jax.Array,
               clip_text: jax.Array | None = None, clip_img: jax.Array | None = None,
               effnet: jax.Array | None = None, user_tokens: jax.Array | None = None,
               user_scale: attention.Scale = 1.0) -> jax.Array:
    c, dt = self.config, self.config.dtype
    chans, n = c.block_out_channels, len(c.block_out_channels)
    r_embed = self.ratio_embedding(timestep_ratio)
    clip = self._clip(clip_text_pooled, clip_text, clip_img)
    if user_tokens is not None:
      user_tokens = user_tokens.astype(dt)

    def run(kind, block, x, skip=None):
      if kind == R:
        return block(x, skip)
      return block(x, r_embed) if kind == T else block(x, clip, user_tokens, user_scale)

    x = ops.pixel_unshuffle(sample.astype(dt), c.patch_size)
    x = blocks.channel_norm(blocks.conv1x1(chans[0], dt, "embedding_1")(x))
    x = self._stage_b_terms(x, effnet)
    skips = []
    for i in range(n):                                         # x: [B, H_i, W_i, C_i]
      if i > 0:
        x = self._downscale(blocks.channel_norm(x), i)
      level = self._level(f"down_blocks_{i}", i, c.down_num_layers_per_block[i])
      for rep in range(c.down_blocks_repeat_mappers[i]):      # weight-shared passes
        if rep:
          x = blocks.conv1x1(chans[i], dt, f"down_repeat_mappers_{i}_{rep - 1}")(x)
        for kind, block in level:
          x = run(kind, block, x)
      skips.insert(0, x)
    x = skips[0]
    for u in range(n):                                         # up: level i = n - 1 - u
      i = n - 1 - u
      level = self._level(f"up_blocks_{u}", i, c.up_num_layers_per_block[u])
      for rep in range(c.up_blocks_repeat_mappers[u]):
        if rep:
          x = blocks.conv1x1(chans[i], dt, f"up_repeat_mappers_{u}_{rep - 1}")(x)
        for j, (kind, block) in enumerate(level):
          skip = skips[u] if kind == R and j == 0 and u > 0 else None
          if skip is not None:                                 # odd sizes: x to the skip's
            x = ops.resize_align_corners(x, skip.shape[1:3])
          x = run(kind, block, x, skip)
      if i > 0:
        x = self._upscale(blocks.channel_norm(x), u, chans[i - 1])
    x = blocks.conv1x1(c.out_channels * c.patch_size ** 2, dt, "clf_1")(blocks.channel_norm(x))
    return ops.pixel_shuffle(x, c.patch_size).astype(jnp.float32)

  def ratio_embedding(self, timestep_ratio: jax.Array) -> jax.Array:
    """[emb(r), emb(0) per timestep condition] [B, 64 (1 + conds)], float32 in any compute dtype
    (the TimestepBlocks' matmuls then run in the compute dtype, like every layer)."""
    c = self.config
    r = jnp.asarray(timestep_ratio, jnp.float32)
    conds = [jnp.zeros_like(r)] * len(c.timestep_conditioning_type)
    return jnp.concatenate([ops.timestep_ratio_embedding(x, c.timestep_ratio_embedding_dim)
                            for x in [r] + conds], axis=-1)

  def _clip(self, pooled, text, img) -> jax.Array:
    """LN([text tokens; clip_seq tokens per pooled vector; clip_seq per image]) [B, S, c_cond]."""
    c, d = self.config, self.config.conditioning_dim
    if pooled.ndim != 3:
      raise ValueError(f"clip_text_pooled must be [B, N, {c.clip_text_pooled_in_channels}], got "
                       f"{pooled.shape}")
    tokens = [layers.Dense(d * c.clip_seq, dtype=c.dtype, name="clip_txt_pooled_mapper")(pooled)]
    if c.clip_text_in_channels is None:
      if text is not None or img is not None:
        raise ValueError("this config has no clip_text / clip_img mappers")
    else:
      if text is None or img is None:
        raise ValueError("Stage C needs clip_text and clip_img (zeros for text-to-image): "
                         "diffusers silently drops the text without the image")
      tokens.insert(0, layers.Dense(d, dtype=c.dtype, name="clip_txt_mapper")(text))
      tokens.append(layers.Dense(d * c.clip_seq, dtype=c.dtype, name="clip_img_mapper")(img))
    b = pooled.shape[0]
    return blocks.channel_norm(jnp.concatenate([t.reshape(b, -1, d) for t in tokens], axis=1))

  def _mapper(self, prefix: str, x: jax.Array) -> jax.Array:
    """conv1x1(-> 4 c0) -> gelu -> conv1x1(-> c0) -> LN: effnet_mapper and pixels_mapper."""
    c0, dt = self.config.block_out_channels[0], self.config.dtype
    x = nn.gelu(blocks.conv1x1(4 * c0, dt, f"{prefix}_0")(x), approximate=False)
    return blocks.channel_norm(blocks.conv1x1(c0, dt, f"{prefix}_2")(x))

  def _stage_b_terms(self, x: jax.Array, effnet: jax.Array | None) -> jax.Array:
    """x += effnet_mapper(resize(effnet)) (resize first);  x += resize(pixels_mapper(0)) (mapper
    first: a constant term, kept as diffusers has it). Without effnet its term is left out."""
    c, size = self.config, x.shape[1:3]
    if c.effnet_in_channels is not None and effnet is not None:
      x = x + self._mapper("effnet_mapper", ops.resize_align_corners(effnet.astype(x.dtype), size))
    if c.pixel_mapper_in_channels is not None:
      pixels = jnp.zeros((x.shape[0], 8, 8, c.pixel_mapper_in_channels), x.dtype)
      x = x + ops.resize_align_corners(self._mapper("pixels_mapper", pixels), size)
    return x

  def _downscale(self, x: jax.Array, i: int) -> jax.Array:
    """Stage C: 1x1 conv at down_downscalers_<i>_1/blocks_0; Stage B: Conv2d k2 s2."""
    c, name = self.config, f"down_downscalers_{i}_1"
    if c.switch_level is not None:
      return blocks.UpDownConv(c.block_out_channels[i], 0, c.dtype, name=name)(x)
    return layers.Conv(c.block_out_channels[i], (2, 2), strides=(2, 2), padding="VALID",
                       dtype=c.dtype, name=name)(x)

  def _upscale(self, x: jax.Array, u: int, features: int) -> jax.Array:
    """Stage C: 1x1 conv at up_upscalers_<u>_1/blocks_1; Stage B: ConvTranspose2d k2 s2."""
    c, name = self.config, f"up_upscalers_{u}_1"
    if c.switch_level is not None:
      return blocks.UpDownConv(features, 1, c.dtype, name=name)(x)
    return layers.ConvTranspose(features, 2, 2, dtype=c.dtype, name=name)(x)

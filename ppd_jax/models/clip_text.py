"""CLIP text encoders as Stable Diffusion uses them: transformers' CLIPTextModel (SD 1.x/2.x, SDXL's
first encoder) and CLIPTextModelWithProjection (SDXL's second encoder), in Flax.

    x_0 = token_embedding(ids) + position_embedding(0..L-1)                    [B, L, C]
    x_i = x_{i-1} + attn(layer_norm1(x_{i-1}));  x_i = x_i + mlp(layer_norm2(x_i))   i = 1..N
    last_hidden_state = final_layer_norm(x_N)
    pooler_output = last_hidden_state[b, eos position of ids[b]]
    text_embeds = text_projection(pooler_output)                                (with projection)

attn is causal multi-head self-attention. Stable Diffusion passes no padding mask: it pads every
prompt to 77 tokens and lets the padding attend (causally), so the padded positions are part of
the conditioning and must be computed the same way. A reward model may pass `attention_mask`
([B, L], 1 = token, 0 = padding), which hides padded keys as transformers does; the EOS-pooled
output never sees later positions (causal), so only padded rows of last_hidden_state change.
The vision tower (clip_vision.py) reuses the encoder with causal=False.

Param paths are transformers' state-dict keys under the naming rule of ppd_jax.weights.convert,
always with the `text_model.` prefix (text_model/encoder/layers_0/self_attn/q_proj/kernel, ...),
plus text_projection/kernel for the projection model; `rename_clip_key` maps both the prefixed
(older, and Stable Diffusion's hub folders) and the unprefixed (transformers 5 CLIPTextModel) key
layouts onto it.
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture of the text encoder. Field names and defaults follow transformers' config.json
  (CLIPTextConfig), so a hub `text_encoder/config.json` maps onto it field by field."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407

  def __post_init__(self):
    check_architecture("CLIPTextConfig", self.hidden_act, self.hidden_size,
                       self.num_attention_heads)

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    """From a transformers config.json dict. Keys that do not shape the inference computation
    (architectures, dtype/torch_dtype, _name_or_path, transformers_version, dropout rates,
    initializer ranges, ...) are ignored; a config of another model type is refused rather than
    silently read with defaults (a full CLIPModel config keeps these fields under text_config)."""
    return config_from_dict(cls, config, "clip_text_model")


def config_from_dict(cls, config: Mapping[str, Any], model_type: str):
  """A config dataclass from a transformers config dict: its own fields only, and only for its
  model type (a missing model_type is taken as that type)."""
  found = config.get("model_type", model_type)
  if found != model_type:
    raise ValueError(f"{cls.__name__}.model_type: unsupported value {found!r} "
                     f"(expected {model_type!r})")
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in config.items() if k in names})


def check_architecture(cls_name: str, hidden_act: str, hidden_size: int, heads: int) -> None:
  if hidden_act not in ACTIVATIONS:
    raise ValueError(f"{cls_name}.hidden_act: unsupported value {hidden_act!r} "
                     f"(supported: {', '.join(ACTIVATIONS)})")
  if hidden_size % heads:
    raise ValueError(f"{cls_name}.hidden_size: {hidden_size} is not divisible by "
                     f"num_attention_heads={heads}")


def rename_clip_key(key: str) -> str | None:
  """A transformers CLIP text key -> its canonical `text_model.`-prefixed form, for
  convert.to_flax(rename=...); None drops it.

  transformers 5 saves CLIPTextModel without the prefix (embeddings.token_embedding.weight),
  CLIPTextModelWithProjection and older versions (Stable Diffusion's hub folders) with it;
  text_projection.weight sits beside text_model in both. The position_ids buffer, saved by older
  versions, is arange(max_position_embeddings) and carries nothing to load.
  """
  if key.endswith("embeddings.position_ids"):
    return None
  if key.startswith(("text_model.", "text_projection.")):
    return key
  return f"text_model.{key}"


def penultimate(outputs: Mapping[str, Any]) -> jax.Array:
  """The output of the second-to-last encoder layer, [B, L, C], without the final layer norm.

  SDXL (both encoders, concatenated) and SD 2.x's OpenCLIP setup condition the UNet on this rather
  than on last_hidden_state: diffusers takes `hidden_states[-2]`, which is the raw residual stream
  after layer N-1 (the final_layer_norm is applied to layer N's output only).
  """
  return outputs["hidden_states"][-2]


def activation(name: str):
  """quick_gelu(x) = x * sigmoid(1.702 x) (OpenAI CLIP); gelu is the exact erf GELU (OpenCLIP)."""
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  return lambda x: nn.gelu(x, approximate=False)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
  """Self-attention (causal for text, not for vision); q/k/v/out projections all with bias.

      A = softmax(q k^T / sqrt(d) + causal mask + padding mask) v     per head, d = hidden / heads
  jax.nn.dot_product_attention keeps the logits and the softmax in float32 for bf16 inputs.
  """
  heads: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None   # jax.nn.dot_product_attention's: None/"xla" or "cudnn"
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """key_mask: [B, L] bool, False for padding keys (None: every key is visible)."""
    c = x.shape[-1]
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, c // self.heads))
    proj = lambda name: split(nn.Dense(c, dtype=self.dtype, name=name)(x))
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
    out = jax.nn.dot_product_attention(proj("q_proj"), proj("k_proj"), proj("v_proj"),
                                       mask=mask, is_causal=self.causal,
                                       implementation=self.implementation)
    return nn.Dense(c, dtype=self.dtype, name="out_proj")(out.reshape(x.shape))


class CLIPMLP(nn.Module):
  """fc2(act(fc1(x))), hidden -> intermediate -> hidden."""
  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(activation(self.hidden_act)(h))


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm block: x += attn(layer_norm1(x)); x += mlp(layer_norm2(x)).

  config: a CLIPTextConfig or clip_vision.CLIPVisionConfig (the fields used are the same)."""
  config: Any
  dtype: Dtype = jnp.float32
  implementation: str | None = None
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm1")(x)
    x = x + CLIPAttention(cfg.num_attention_heads, self.dtype, self.implementation, self.causal,
                          name="self_attn")(h, key_mask)
    h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm2")(x)
    return x + CLIPMLP(cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(h)


class CLIPTextEmbeddings(nn.Module):
  """token_embedding(ids) + position_embedding(0..L-1): learned absolute positions."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    length = input_ids.shape[-1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"CLIP text: sequence length {length} exceeds max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype, name=name)
    tokens = embed(cfg.vocab_size, "token_embedding")(input_ids)
    positions = embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(length))
    return tokens + positions[None]


class CLIPEncoder(nn.Module):
  """num_hidden_layers CLIPEncoderLayers; returns every layer's output."""
  config: Any
  dtype: Dtype = jnp.float32
  implementation: str | None = None
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> tuple[jax.Array, ...]:
    outs = []
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.dtype, self.implementation, self.causal,
                           name=f"layers_{i}")(x, key_mask)
      outs.append(x)
    return tuple(outs)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """[B, L] ids -> [B] index pooled by transformers' CLIPTextModel.

  Normally the first position holding eos_token_id (pad may equal eos, so the first one; 0 if
  there is none). Configs written before transformers PR #24773 carry eos_token_id == 2, and for
  them transformers keeps the original rule, argmax(ids): the EOS token (49407) is the largest id
  of CLIP's vocabulary. Stable Diffusion 1.x's text_encoder/config.json is such a config.
  """
  ids = input_ids.astype(jnp.int32)
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nn.Module):
  """embeddings -> encoder -> final_layer_norm, and EOS pooling (transformers' inner text model,
  the `text_model` of both public classes)."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> dict[str, Any]:
    cfg = self.config
    x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
    layers = CLIPEncoder(cfg, self.dtype, self.implementation, name="encoder")(x, attention_mask)
    hidden_states = (x,) + layers
    last = layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(hidden_states[-1])
    pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
    return {"last_hidden_state": last, "hidden_states": hidden_states, "pooler_output": pooled}


class CLIPTextModel(nn.Module):
  """transformers' CLIPTextModel, or CLIPTextModelWithProjection when with_projection.

  __call__(input_ids [B, L] int, attention_mask [B, L] (1 token, 0 padding) or None) -> dict:
    last_hidden_state [B, L, C]   after final_layer_norm (SD 1.x conditioning)
    hidden_states     N + 1 arrays [B, L, C]: the embeddings, then each layer's output (no final
                      norm), as transformers' output_hidden_states=True gives them
    pooler_output     [B, C]      last_hidden_state at the EOS token
    text_embeds       [B, projection_dim] = text_projection(pooler_output), with_projection only
                      (SDXL's pooled text conditioning)
  Params are float32 (flax's default param_dtype); `dtype` is the compute dtype.
  """
  config: CLIPTextConfig
  with_projection: bool = False
  dtype: Dtype = jnp.float32
  implementation: str | None = None   # jax.nn.dot_product_attention's: None/"xla" or "cudnn"

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> dict[str, Any]:
    out = CLIPTextTransformer(self.config, self.dtype, self.implementation,
                              name="text_model")(input_ids, attention_mask)
    if self.with_projection:
      out["text_embeds"] = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                    name="text_projection")(out["pooler_output"])
    return out

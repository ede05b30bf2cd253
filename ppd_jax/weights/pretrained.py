"""A published Stable Diffusion pipeline (SD 1.x / 2.x / SDXL) as Flax modules and params.

    folder or hub id ──► model_index.json, unet/ vae/ text_encoder[_2]/ tokenizer[_2]/ scheduler
                     ──► UNet base params, AutoencoderKL, CLIP text encoder(s) + tokenizer(s)

The folder is the truth about the architecture: `apply_to_config` copies its UNet and noise
schedule fields into config.model / config.diffusion before the config is validated, so a run's
saved config records what it really trained on. Weights load through weights/convert.py, which
names any missing or unexpected key.
"""
import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from ppd_jax.models import clip_text
from ppd_jax.models import unet as unet_lib
from ppd_jax.models import vae as vae_lib
from ppd_jax.weights import convert
from ppd_jax.weights import hf_folder

# config.model fields that the folder's unet/config.json decides.
UNET_FIELDS = ("sample_size", "in_channels", "out_channels", "block_out_channels",
               "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
               "cross_attention_dim", "norm_num_groups", "transformer_layers_per_block",
               "use_linear_projection", "upcast_attention", "addition_embed_type",
               "addition_time_embed_dim", "projection_class_embeddings_input_dim")
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                   "prediction_type")
_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """What a folder holds, read from its JSON files (no weights loaded yet)."""
  folder: str
  kind: str                           # "sd" (1.x / 2.x) or "sdxl"
  variant: str
  index: dict                         # model_index.json
  unet: unet_lib.UNetConfig
  vae: Any                            # vae.VAEConfig
  text_encoders: tuple[tuple[str, clip_text.CLIPTextConfig, bool], ...]  # (subfolder, cfg, proj)
  scheduler: dict

  @property
  def force_zeros_for_empty_prompt(self) -> bool:
    """SDXL pipelines use all-zero text conditioning for the empty (negative) prompt."""
    return self.kind == "sdxl" and self.index.get("force_zeros_for_empty_prompt", True)


@functools.lru_cache(maxsize=4)
def open_pipeline(name_or_path: str, variant: str = "") -> Pipeline:
  folder = hf_folder.resolve(name_or_path, variant)
  index = hf_folder.read_json(folder, "model_index.json")
  name = index.get("_class_name")
  if name not in _PIPELINES:
    raise hf_folder.FolderError(f"{folder}/model_index.json: _class_name={name!r} is not one of "
                                f"{sorted(_PIPELINES)}")
  kind = _PIPELINES[name]
  try:
    unet = unet_lib.config_from_diffusers(hf_folder.read_json(folder, "unet", "config.json"))
    vae = vae_lib.VAEConfig.from_diffusers(hf_folder.read_json(folder, "vae", "config.json"))
  except ValueError as e:
    raise hf_folder.FolderError(f"{folder}: {e}") from e
  encoders = []
  for sub in ("text_encoder", "text_encoder_2") if kind == "sdxl" else ("text_encoder",):
    cls = (index.get(sub) or [None, None])[1]
    if cls not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
      raise hf_folder.FolderError(f"{folder}/model_index.json: {sub} is {cls!r}, expected "
                                  "CLIPTextModel or CLIPTextModelWithProjection")
    try:
      cfg = clip_text.CLIPTextConfig.from_transformers(
          hf_folder.read_json(folder, sub, "config.json"))
    except ValueError as e:
      raise hf_folder.FolderError(f"{folder}/{sub}/config.json: {e}") from e
    encoders.append((sub, cfg, cls == "CLIPTextModelWithProjection"))
  scheduler = hf_folder.read_json(folder, "scheduler", "scheduler_config.json")
  _check_sizes(folder, kind, unet, vae, encoders)
  return Pipeline(folder, kind, variant, index, unet, vae, tuple(encoders), scheduler)


def _check_sizes(folder, kind, unet, vae, encoders) -> None:
  """The components must fit together; a mismatch names the two config files."""
  def fail(what):
    raise hf_folder.FolderError(f"{folder}: {what}")
  if vae.latent_channels not in (unet.in_channels, unet.out_channels) or (
      unet.in_channels != unet.out_channels):
    fail(f"vae/config.json latent_channels={vae.latent_channels} but unet/config.json has "
         f"in_channels={unet.in_channels}, out_channels={unet.out_channels}")
  if kind == "sd":
    width = encoders[0][1].hidden_size
  else:
    width = sum(cfg.hidden_size for _, cfg, _ in encoders)
    pooled = encoders[-1][1].projection_dim + 6 * unet.addition_time_embed_dim
    if unet.addition_embed_type != "text_time" or (
        pooled != unet.projection_class_embeddings_input_dim):
      fail(f"an SDXL UNet needs addition_embed_type='text_time' and "
           f"projection_class_embeddings_input_dim = text_encoder_2 projection_dim + 6 x "
           f"addition_time_embed_dim = {pooled}; unet/config.json has "
           f"{unet.addition_embed_type!r}, {unet.projection_class_embeddings_input_dim}")
  if width != unet.cross_attention_dim:
    fail(f"the text encoder(s) give {width}-wide states but unet/config.json has "
         f"cross_attention_dim={unet.cross_attention_dim}")


def apply_to_config(config) -> Pipeline:
  """Copies the folder's UNet architecture and training noise schedule into `config` (in place)."""
  m = config.model
  pipe = open_pipeline(m.pretrained, m.variant)
  for field in UNET_FIELDS:
    value = getattr(pipe.unet, field)
    if field == "addition_embed_type":
      value = value or ""
    setattr(m, field, value)
  defaults = {"prediction_type": "epsilon", "num_train_timesteps": 1000}
  for field in SCHEDULE_FIELDS:
    value = pipe.scheduler.get(field, defaults.get(field))
    if value is None:
      raise hf_folder.FolderError(f"{pipe.folder}/scheduler/scheduler_config.json has no {field}")
    setattr(config.diffusion, field, value)
  if pipe.scheduler.get("trained_betas") is not None:
    raise hf_folder.FolderError(f"{pipe.folder}/scheduler/scheduler_config.json: trained_betas "
                                "(an explicit beta table) is not supported")
  return pipe


def _to_numpy_tree(state_dict, target, what, rename=lambda k: k):
  return convert.to_flax(state_dict, target, what=what, rename=rename)


def load_unet(pipe: Pipeline, unet_shapes) -> dict:
  """The UNet's params (nested numpy float32) for the tree `unet_shapes` (from eval_shape)."""
  state = hf_folder.read_weights(pipe.folder, "unet", pipe.variant)
  return _to_numpy_tree(state, unet_shapes, f"{pipe.folder}/unet")


def load_vae(pipe: Pipeline, dtype=np.float32, attention_impl: str | None = None):
  """(AutoencoderKL module, params); attention_impl: its attention kernel (config.model's)."""
  module = vae_lib.AutoencoderKL(pipe.vae, attention_impl=attention_impl)
  shapes = jax.eval_shape(lambda k: vae_lib.init_params(module, k), jax.random.key(0))
  state = vae_lib.legacy_vae_state_dict(hf_folder.read_weights(pipe.folder, "vae", pipe.variant))
  return module, jax.tree.map(lambda x: x.astype(dtype),
                              _to_numpy_tree(state, shapes, f"{pipe.folder}/vae"))


def load_text_encoder(pipe: Pipeline, index: int):
  """(subfolder, CLIPTextModel module, params, tokenizer) of text encoder `index`."""
  sub, cfg, with_projection = pipe.text_encoders[index]
  module = clip_text.CLIPTextModel(cfg, with_projection=with_projection)
  ids = jax.ShapeDtypeStruct((1, cfg.max_position_embeddings), np.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
  state = hf_folder.read_weights(pipe.folder, sub, pipe.variant)
  params = _to_numpy_tree(state, shapes, f"{pipe.folder}/{sub}", rename=clip_text.rename_clip_key)
  return sub, module, params, load_tokenizer(pipe, sub.replace("text_encoder", "tokenizer"))


def load_tokenizer(pipe: Pipeline, sub: str):
  """The CLIP tokenizer saved in the folder (transformers reads vocab.json + merges.txt)."""
  try:
    from transformers import CLIPTokenizer
  except ImportError as e:
    raise hf_folder.FolderError(
        "the tokenizer needs transformers: pip install 'ppd_jax[hf]'") from e
  path = f"{pipe.folder}/{sub}"
  try:
    return CLIPTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise hf_folder.FolderError(f"{path}: cannot load the CLIP tokenizer ({e})") from e

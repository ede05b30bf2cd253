"""A transformers CLIP folder (CLIPModel, or CLIPVisionModelWithProjection) -> Flax module + params.

    folder or hub id ──► config.json + model.safetensors (or shards) + tokenizer files
                     ──► clip.CLIPModel / clip_vision.CLIPVisionModel, float32 numpy params

The same reader takes a converted open_clip checkpoint (weights/convert_open_clip.py writes this
layout). Weights are read with safetensors' numpy API (no torch); any missing, unexpected or
mis-shaped key is an error naming it (weights/convert.py).
"""
import os

import jax
import numpy as np
from flax import traverse_util

from ppd_jax.models import clip
from ppd_jax.models import clip_vision
from ppd_jax.weights import convert
from ppd_jax.weights import hf_folder

_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))   # either set


def _drop_buffers(key: str) -> str | None:
  """position_ids buffers (saved by older transformers) carry nothing to load."""
  return None if key.endswith("embeddings.position_ids") else key


def read_config(folder: str) -> dict:
  return hf_folder.read_json(folder, "config.json")


def load_clip(name_or_path: str, flag: str = "--model"):
  """(CLIPModel module, params) of a CLIPModel folder or hub id."""
  folder = hf_folder.resolve_model(name_or_path, flag)
  try:
    config = clip.CLIPConfig.from_transformers(read_config(folder))
  except ValueError as e:
    raise hf_folder.FolderError(f"{folder}/config.json: {e}") from e
  module = clip.CLIPModel(config)
  state = hf_folder.read_weights(folder, "")
  params = convert.to_flax(state, clip.init_shapes(module), what=folder, rename=_drop_buffers)
  return module, params


def load_vision(name_or_path: str, flag: str = "--model"):
  """(CLIPVisionModel with projection, params) of a CLIPModel folder (its image tower only; the
  text weights are not converted) or a CLIPVisionModelWithProjection folder."""
  folder = hf_folder.resolve_model(name_or_path, flag)
  raw = read_config(folder)
  try:
    if raw.get("model_type") == "clip":
      vision = clip.CLIPConfig.from_transformers(raw).vision
    else:
      vision = clip_vision.CLIPVisionConfig.from_transformers(raw)
  except ValueError as e:
    raise hf_folder.FolderError(f"{folder}/config.json: {e}") from e
  module = clip_vision.CLIPVisionModel(vision, with_projection=True)
  state = {k: v for k, v in hf_folder.read_weights(folder, "").items()
           if k.startswith(("vision_model.", "visual_projection."))}
  return module, convert.to_flax(state, vision_shapes(module), what=folder, rename=_drop_buffers)


def vision_shapes(module: clip_vision.CLIPVisionModel) -> dict:
  """The vision model's param shapes (jax.eval_shape: nothing is allocated)."""
  cfg = module.config
  pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), np.float32)
  return jax.eval_shape(module.init, jax.random.key(0), pixels)["params"]


def load_tokenizer(folder: str, fallback: str | None = None, override: str | None = None):
  """The CLIP tokenizer `override` (a folder or hub id) if given, else the one saved in `folder`,
  else `fallback`, for folders that hold none (a converted open_clip checkpoint: open_clip's BPE
  is CLIP's)."""
  try:
    from transformers import CLIPTokenizer
  except ImportError as e:
    raise hf_folder.FolderError("the CLIP tokenizer needs transformers: pip install "
                                "'ppd_jax[hf]'") from e
  source = override or folder
  has_tokenizer = any(all(os.path.exists(os.path.join(folder, f)) for f in files)
                      for files in _TOKENIZER_FILES)
  if not override and not has_tokenizer:
    if fallback is None:
      raise hf_folder.FolderError(f"{folder} has no tokenizer (tokenizer.json, or vocab.json "
                                  "and merges.txt)")
    source = fallback
  try:
    return CLIPTokenizer.from_pretrained(source)
  except (OSError, ValueError) as e:
    raise hf_folder.FolderError(f"{source}: cannot load the CLIP tokenizer ({e})") from e


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in traverse_util.flatten_dict(params).values())

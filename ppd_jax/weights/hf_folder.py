"""Reading a diffusers-format pipeline folder or a transformers-format model folder (or hub
snapshot): JSON configs and safetensors as numpy.

A pipeline folder holds model_index.json and one subfolder per component (unet/, vae/,
text_encoder/, tokenizer/, scheduler/, ...); a model folder (a CLIP reward model) holds config.json,
its weights and tokenizer files at the root (component ""). Weights are `<stem>.safetensors`, an fp16 variant
`<stem>.fp16.safetensors`, or shards listed in `<stem>.safetensors.index.json` (variant:
`<stem>.safetensors.index.fp16.json` or `<stem>.fp16.safetensors.index.json`). They are read with
safetensors' numpy API: no torch at run time.
"""
import json
import os

import numpy as np
from safetensors import safe_open

from ppd_jax.weights import WeightFileError

WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model",
                **{sub: "diffusion_pytorch_model"   # Stable Cascade's components
                   for sub in ("prior", "prior_lite", "decoder", "decoder_lite", "vqgan")}}
# What a snapshot download fetches: configs, tokenizer files and safetensors (never .bin / .ckpt).
_HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model"]
_MODEL_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors"]


class FolderError(WeightFileError):
  """A model folder that is missing, incomplete or unreadable; the message names the file."""


def resolve(name_or_path: str, variant: str = "") -> str:
  """A local pipeline folder (model_index.json at its root) as is; else a hub id, downloaded
  (configs + safetensors) to the HF cache."""
  suffix = f".{variant}.safetensors" if variant else ".safetensors"
  return _resolve(name_or_path, "model_index.json", "a diffusers-format pipeline folder",
                  _HUB_PATTERNS + [f"*/*{suffix}", "*/*.index*.json"], "model.pretrained")


def resolve_model(name_or_path: str, flag: str = "--model") -> str:
  """A transformers model folder (config.json at its root) as is; else a hub id, downloaded
  (configs, tokenizer files, safetensors; never .bin) to the HF cache. `flag` names the setting
  in errors."""
  return _resolve(name_or_path, "config.json", "a transformers model folder",
                  _MODEL_HUB_PATTERNS, flag)


def _resolve(name_or_path: str, marker: str, kind: str, patterns: list[str], flag: str) -> str:
  path = os.path.abspath(os.path.expanduser(name_or_path))
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, marker)):
      raise FolderError(f"{flag}={name_or_path!r}: {path} has no {marker} (expected {kind})")
    return path
  if name_or_path.count("/") != 1 or os.path.exists(path):
    raise FolderError(f"{flag}={name_or_path!r}: not a folder here, nor a hub id (owner/name)")
  return _download(name_or_path, patterns, flag)


def _download(repo_id: str, patterns: list[str], flag: str) -> str:
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:
    raise FolderError(f"{flag}={repo_id!r} is a hub id: pip install 'ppd_jax[hf]' to download "
                      "it, or pass a local folder") from e
  try:
    return snapshot_download(repo_id, allow_patterns=patterns)
  except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors alike
    raise FolderError(f"{flag}={repo_id!r}: download failed ({e})") from e


def read_json(folder: str, *parts: str) -> dict:
  path = os.path.join(folder, *parts)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FolderError(f"{path} is missing") from None
  except (OSError, json.JSONDecodeError) as e:
    raise FolderError(f"{path} is not readable JSON: {e}") from e


def _weight_files(sub: str, stem: str, variant: str) -> list[str]:
  """The safetensors file(s) of one component, per the naming rules in the module docstring."""
  def exists(name):
    return os.path.exists(os.path.join(sub, name))

  single = [f"{stem}.{variant}.safetensors"] if variant else [f"{stem}.safetensors"]
  index = ([f"{stem}.safetensors.index.{variant}.json", f"{stem}.{variant}.safetensors.index.json"]
           if variant else [f"{stem}.safetensors.index.json"])
  for name in single:
    if exists(name):
      return [os.path.join(sub, name)]
  for name in index:
    if exists(name):
      shards = read_json(sub, name).get("weight_map", {}).values()
      return [os.path.join(sub, s) for s in sorted(set(shards))]
  if not variant and exists(f"{stem}.fp16.safetensors"):
    return [os.path.join(sub, f"{stem}.fp16.safetensors")]   # only the fp16 variant is there
  raise FolderError(f"{sub}: no weights {' or '.join(single + index)}"
                    + (" (a .bin/.ckpt file needs converting to safetensors)"
                       if any(n.endswith((".bin", ".ckpt")) for n in os.listdir(sub)) else ""))


def read_weights(folder: str, component: str, variant: str = "") -> dict[str, np.ndarray]:
  """All tensors of one component ("" for a model folder's root) as numpy arrays (fp16 files
  stay fp16 until converted)."""
  sub = os.path.join(folder, component) if component else folder
  if not os.path.isdir(sub):
    raise FolderError(f"{sub} is missing (model_index.json lists the components)")
  out = {}
  for path in _weight_files(sub, WEIGHT_STEMS.get(component, "model"), variant):
    try:
      with safe_open(path, framework="np") as f:
        for key in f.keys():
          out[key] = f.get_tensor(key)
    except FileNotFoundError:
      raise FolderError(f"{path} is missing (listed in the shard index)") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
      raise FolderError(f"{path} is not a readable safetensors file: {e}") from e
  return out

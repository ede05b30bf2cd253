"""A published Stable Cascade (the hub's two diffusers folders) as Flax modules and params.

    PRIOR   (stabilityai/stable-cascade-prior): model_index.json, prior/ | prior_lite/ (Stage C),
            text_encoder/ (CLIP ViT-bigG/14 text, with projection), tokenizer/, scheduler/
    DECODER (stabilityai/stable-cascade):       model_index.json, decoder/ | decoder_lite/
            (Stage B), vqgan/ (Stage A, Paella), effnet_encoder.safetensors (Stage C's x0)

The prior's config.json is the truth about Stage C: `apply_to_config` copies it into
config.model.cascade (with the latent grid and the schedule) before the config is validated, so a
run's saved config records what it trained on. The decoder is only needed to make images
(sampling) and latents (precompute); training reads neither. Stage B's pooled text comes from the
prior's text encoder: the hub's two text_encoder/ folders hold the same CLIP bigG weights.
"""
import dataclasses
import functools
import os

import jax
import numpy as np

from ppd_jax.models import cascade
from ppd_jax.models import clip_text
from ppd_jax.models import effnet
from ppd_jax.models import paella
from ppd_jax.weights import convert
from ppd_jax.weights import hf_folder

PRIOR_HUB = "stabilityai/stable-cascade-prior"
DECODER_HUB = "stabilityai/stable-cascade"
EFFNET_FILE = "effnet_encoder.safetensors"
_PRIOR_CLASS = "StableCascadePriorPipeline"
_DECODER_CLASS = "StableCascadeDecoderPipeline"


def _pipeline_folder(name_or_path: str, cls: str, subfolders: tuple[str, ...], flag: str,
                     extra: tuple[str, ...] = ()) -> str:
  """The local folder (or hub snapshot) of one of the two pipelines, its class checked."""
  path = os.path.abspath(os.path.expanduser(name_or_path))
  if os.path.isdir(path):
    folder = hf_folder.resolve(path)
  else:
    patterns = ["model_index.json", "scheduler/*.json", "tokenizer/*", "text_encoder/*.json",
                "text_encoder/*.safetensors", *extra]
    for sub in subfolders:
      patterns += [f"{sub}/*.json", f"{sub}/*.safetensors"]
    folder = hf_folder._resolve(name_or_path, "model_index.json", "a diffusers-format folder",
                                patterns, flag)
  index = hf_folder.read_json(folder, "model_index.json")
  if index.get("_class_name") != cls:
    raise hf_folder.FolderError(f"{flag}={name_or_path!r}: {folder}/model_index.json has "
                                f"_class_name={index.get('_class_name')!r}, expected {cls!r}")
  return folder


@dataclasses.dataclass(frozen=True)
class Prior:
  """Stage C's folder: its StableCascadeUNet config, text encoder config and schedule."""
  folder: str
  subfolder: str                         # prior | prior_lite
  variant: str
  unet: dict                             # <subfolder>/config.json
  text: clip_text.CLIPTextConfig
  scheduler: dict


@functools.lru_cache(maxsize=4)
def open_prior(name_or_path: str, subfolder: str = "prior_lite", variant: str = "") -> Prior:
  folder = _pipeline_folder(name_or_path, _PRIOR_CLASS, (subfolder,), "model.pretrained")
  unet = hf_folder.read_json(folder, subfolder, "config.json")
  try:
    cascade.config_from_diffusers(unet)
    text = clip_text.CLIPTextConfig.from_transformers(
        hf_folder.read_json(folder, "text_encoder", "config.json"))
  except ValueError as e:
    raise hf_folder.FolderError(f"{folder}/{subfolder}: {e}") from e
  if unet.get("clip_text_in_channels") != text.hidden_size or (
      unet.get("clip_text_pooled_in_channels") != text.projection_dim):
    raise hf_folder.FolderError(
        f"{folder}: text_encoder/config.json gives {text.hidden_size}-wide states and "
        f"{text.projection_dim}-wide pooled text, {subfolder}/config.json expects "
        f"clip_text_in_channels={unet.get('clip_text_in_channels')}, "
        f"clip_text_pooled_in_channels={unet.get('clip_text_pooled_in_channels')}")
  scheduler = hf_folder.read_json(folder, "scheduler", "scheduler_config.json")
  return Prior(folder, subfolder, variant, unet, text, scheduler)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Stage B and Stage A's folder, and the effnet file at its root."""
  folder: str
  subfolder: str                         # decoder | decoder_lite
  variant: str
  unet: dict
  vqgan: paella.PaellaConfig
  latent_dim_scale: float                # Stage B's grid = int(Stage C's grid x this)


@functools.lru_cache(maxsize=4)
def open_decoder(name_or_path: str, subfolder: str = "decoder_lite",
                 variant: str = "") -> Decoder:
  folder = _pipeline_folder(name_or_path, _DECODER_CLASS, (subfolder, "vqgan"), "model.decoder",
                            extra=(EFFNET_FILE,))
  unet = hf_folder.read_json(folder, subfolder, "config.json")
  try:
    cascade.config_from_diffusers(unet)
    vqgan = paella.PaellaConfig.from_diffusers(hf_folder.read_json(folder, "vqgan", "config.json"))
  except ValueError as e:
    raise hf_folder.FolderError(f"{folder}: {e}") from e
  index = hf_folder.read_json(folder, "model_index.json")
  return Decoder(folder, subfolder, variant, unet, vqgan,
                 float(index.get("latent_dim_scale", 10.67)))


def apply_to_config(config) -> Prior:
  """Copies the prior's Stage C architecture, latent channels and schedule into `config`."""
  m = config.model
  prior = open_prior(m.pretrained, m.prior_subfolder, m.variant)
  m.cascade = dict(prior.unet)
  m.in_channels = int(prior.unet.get("in_channels", 16))
  from ppd_jax.diffusion import cascade_schedule
  schedule = cascade_schedule.from_diffusers_config(prior.scheduler)
  config.diffusion.process = "cascade"
  config.diffusion.cosine_s = schedule.s
  if m.get("decoder"):
    decoder = open_decoder(m.decoder, m.decoder_subfolder, m.variant)
    effnet_in = decoder.unet.get("effnet_in_channels")
    if effnet_in != m.in_channels:
      raise hf_folder.FolderError(
          f"{decoder.folder}/{decoder.subfolder}/config.json effnet_in_channels={effnet_in}, but "
          f"Stage C ({prior.folder}/{prior.subfolder}) makes {m.in_channels}-channel latents")
  return prior


def load_prior(prior: Prior, unet_shapes) -> dict:
  """Stage C's params (nested numpy float32) for the tree `unet_shapes` (from eval_shape)."""
  state = hf_folder.read_weights(prior.folder, prior.subfolder, prior.variant)
  return convert.to_flax(state, unet_shapes, what=f"{prior.folder}/{prior.subfolder}",
                         transposed=cascade.TRANSPOSED)


def load_stage_b(decoder: Decoder, **overrides):
  """(StableCascadeUNet module for Stage B, params)."""
  cfg = cascade.config_from_diffusers(decoder.unet, **overrides)
  module = cascade.StableCascadeUNet(cfg)
  from ppd_jax.models import personalized_cascade
  shapes = personalized_cascade.abstract_params(module)
  state = hf_folder.read_weights(decoder.folder, decoder.subfolder, decoder.variant)
  return module, convert.to_flax(state, shapes, what=f"{decoder.folder}/{decoder.subfolder}",
                                 transposed=cascade.TRANSPOSED)


def load_vqgan(decoder: Decoder):
  """(PaellaVQModel, {"params", "batch_stats"})."""
  module = paella.PaellaVQModel(decoder.vqgan)
  state = hf_folder.read_weights(decoder.folder, "vqgan", decoder.variant)
  return module, paella.variables_from_state_dict(state, module, what=f"{decoder.folder}/vqgan")


def load_effnet(decoder: Decoder):
  """(EfficientNetEncoder, {"params", "batch_stats"}) from DECODER/effnet_encoder.safetensors."""
  path = os.path.join(decoder.folder, EFFNET_FILE)
  if not os.path.exists(path):
    raise hf_folder.FolderError(f"{path} is missing: Stage C's latents (precompute) need the "
                                "EfficientNet encoder of stabilityai/stable-cascade")
  from safetensors.numpy import load_file
  try:
    state = load_file(path)
  except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
    raise hf_folder.FolderError(f"{path} is not a readable safetensors file: {e}") from e
  module = effnet_from_state_dict(state, path)
  return module, effnet.variables_from_state_dict(state, module, what=path)


def effnet_from_state_dict(state: dict, what: str) -> effnet.EfficientNetEncoder:
  """The EfficientNetEncoder a state dict holds: efficientnet_v2_s for the real file; widths and
  depths read from the shapes, so smaller files of the same layout (tests) load too. Strides are
  not in the weights and are efficientnet_v2_s's per stage."""
  stage_ids = sorted({int(k.split(".")[1]) for k in state if k.startswith("backbone.")})
  if len(stage_ids) != len(effnet.STAGES) + 2:
    raise hf_folder.FolderError(f"{what}: {len(stage_ids)} backbone stages, expected "
                                f"{len(effnet.STAGES) + 2} (efficientnet_v2_s's features)")
  stages = []
  for i, ref in enumerate(effnet.STAGES):
    prefix = f"backbone.{i + 1}."
    depth = len({k.split(".")[2] for k in state if k.startswith(prefix)})
    convs = {}   # block 0's convs: block.<k>.0.weight [out, in / groups, kh, kw]
    for key, value in state.items():
      parts = key[len(prefix):].split(".")
      if key.startswith(prefix + "0.block.") and parts[3:] == ["0", "weight"]:
        convs[int(parts[2])] = value.shape
    if not convs:
      raise hf_folder.FolderError(f"{what}: no convs under {prefix}0.block")
    fused = not any(k.startswith(prefix + "0.") and ".fc1." in k for k in state)
    first, kernel = convs[0], max(shape[-1] for shape in convs.values())
    if fused:
      c_in, ratio = first[1], (first[0] // first[1] if len(convs) > 1 else 1)
    elif first[-1] == 1:                               # MBConv with a 1x1 expansion
      c_in, ratio = first[1], first[0] // first[1]
    else:                                              # MBConv, depthwise first (no expansion)
      c_in, ratio = first[0], 1
    stages.append(effnet.Stage(fused, int(ratio), int(kernel), ref.stride, int(c_in),
                               int(convs[max(convs)][0]), depth))
  head = state[f"backbone.{len(effnet.STAGES) + 1}.0.weight"].shape[0]
  latent = state["mapper.0.weight"].shape[0]
  return effnet.EfficientNetEncoder(tuple(stages), int(head), int(latent))


def load_text_encoder(prior: Prior):
  """(CLIPTextModel with projection, params, tokenizer) of the prior's text_encoder/."""
  module = clip_text.CLIPTextModel(prior.text, with_projection=True)
  ids = jax.ShapeDtypeStruct((1, prior.text.max_position_embeddings), np.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
  state = hf_folder.read_weights(prior.folder, "text_encoder", prior.variant)
  params = convert.to_flax(state, shapes, what=f"{prior.folder}/text_encoder",
                           rename=clip_text.rename_clip_key)
  try:
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(prior.folder, "tokenizer"))
  except (OSError, ValueError) as e:
    raise hf_folder.FolderError(f"{prior.folder}/tokenizer: cannot load it ({e})") from e
  return module, params, tokenizer

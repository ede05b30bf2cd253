"""Trained user branch -> diffusers IP-Adapter weights, for PyTorch pipelines.

PPD's user branch is an IP-Adapter whose "image" is the user embedding [T, E], so diffusers runs
it unchanged once the weights carry IP-Adapter names (the original IP-Adapter file layout, which
`pipe.load_ip_adapter` reads). The projector (models/user_projector.py) decides the image_proj
layout. One-token embeddings (T = 1), SingleTokenUserProjector, IP-Adapter's ImageProjModel:

    user_projector/proj/kernel [E, K*D]  -> image_proj.proj.weight [K*D, E]   (Linear: transposed)
    user_projector/proj/bias             -> image_proj.proj.bias
    user_projector/norm/scale, bias      -> image_proj.norm.weight, bias      (LayerNorm)

`proj.weight` makes diffusers build ImageProjection (Linear E -> K*D, reshape [K, D], LayerNorm),
which is SingleTokenUserProjector, but diffusers 0.42's loader (loaders/unet.py,
`_convert_ip_adapter_image_proj_to_diffusers`) hard-codes num_image_text_embeds = 4 and reads D as
proj.weight.shape[0] // 4: any other K fails to load there (size mismatch), so export refuses it.
Multi-token embeddings (T > 1), UserProjector, the "Full" projection:

    user_projector/proj_0/kernel [E, E]  -> image_proj.proj.0.weight [E, E]   (Linear: transposed)
    user_projector/proj_0/bias           -> image_proj.proj.0.bias
    user_projector/proj_2/kernel [E, D]  -> image_proj.proj.2.weight [D, E]
    user_projector/proj_2/bias           -> image_proj.proj.2.bias
    user_projector/proj_3/scale, bias    -> image_proj.proj.3.weight, bias    (LayerNorm)

`proj.3.weight` makes diffusers build IPAdapterFullImageProjection (FeedForward E->E->D with exact
GELU, then LayerNorm), which is UserProjector. Both layouts share the attention layers:

    unet/<attn2 k>/to_k_user/kernel [D, C] -> ip_adapter.<2k+1>.to_k_ip.weight [C, D]
    unet/<attn2 k>/to_v_user/kernel [D, C] -> ip_adapter.<2k+1>.to_v_ip.weight [C, D]

IPAdapterAttnProcessor2_0 computes to_out(A(q, k, v) + scale * A(q, to_k_ip(u), to_v_ip(u))),
which is our attn2 with user_scale.

Processor numbering (diffusers 0.42, loaders/unet.py `_convert_ip_adapter_attn_to_diffusers`): it
walks `unet.attn_processors` in order, starts a counter at 1, and gives each cross-attention
processor (name not ending in "attn1.processor") the current value, then adds 2. So the k-th
cross-attention (k = 0, 1, ...) in that walk is `ip_adapter.<2k+1>`. (This is the original
IP-Adapter's index into the list of all processors, where attn1/attn2 alternate.)
`attn_processors` lists modules in registration order, and UNet2DConditionModel registers
`down_blocks`, then `up_blocks`, then `mid_block`: the walk is
    down_blocks 0..n-1 (blocks with attention), up_blocks 0..n-1, then mid_block,
and inside a block attentions_0.., inside each Transformer2DModel transformer_blocks_0.., each
with one attn2. Up block i has layers_per_block[n-1-i] + 1 attentions of
transformer_layers_per_block[n-1-i] layers; the mid block one attention of
transformer_layers_per_block[-1] layers. SD 1.5 gives 16 cross-attentions (1, 3, ..., 31), SDXL
70 (1, ..., 139). `cross_attention_layers` derives this list from the UNetConfig, and the export
requires the user params to be exactly these layers plus the projector.

Calling it: `ip_adapter_image_embeds=[embeds]`, one "image" per row. MultiIPAdapterImageProjection
flattens [batch, images] to batch rows, projects, and restores them: embeds [batch, 1, E] for
ImageProjection (it reshapes its [batch, K*D] output to [batch, K, D]), [batch, 1, T, E] for the
Full projection (which maps the T tokens one by one); both give [batch, 1, tokens, D]. Classifier-
free guidance: pipelines split embeds into [negative; positive] halves along the batch and run the
user branch at the same scale on both, while PPD's sampler runs the unconditional half with the
user branch off. No negative embedding does that exactly: its half adds scale * A(q, K(n), V(n)),
a convex mix of to_v_ip(t) over projected tokens t = LN(h) * w + b; all layers' to_v_ip stacked
generically have full column rank, so t would have to be 0, i.e. LN(h) = -b / w, which a
zero-mean unit-variance LN(h) generally cannot be. Per-row masks do it exactly:
cross_attention_kwargs={"ip_adapter_masks": [mask]}, mask [2n, 1, 1, 1] = n zeros then n ones,
multiplies each row's user output by its value (IPAdapterAttnProcessor2_0's masked path; a 1x1
mask stays constant through its bicubic resize): the negative rows get exactly 0. The pipeline
repeats embeds num_images_per_prompt times itself, so embeds has 2 * len(prompts) rows while the
mask, applied to the UNet's batch, has 2n, n = len(prompts) * num_images_per_prompt.
"""
import json
import os
import tempfile
from typing import Any, Mapping

import flax
import numpy as np
from flax import traverse_util

from ppd_jax import storage
from ppd_jax.models import unet as unet_lib
from ppd_jax.weights import export_usage
from ppd_jax.weights.convert import WeightsError

Path = tuple[str, ...]

# The ImageProjection token count diffusers' loader assumes for `image_proj.proj.weight`.
DIFFUSERS_IMAGE_PROJ_TOKENS = 4

_SINGLE_TOKEN_PROJECTOR = {   # our leaf -> (IP-Adapter key, transpose); T = 1
    ("user_projector", "proj", "kernel"): ("image_proj.proj.weight", True),
    ("user_projector", "proj", "bias"): ("image_proj.proj.bias", False),
    ("user_projector", "norm", "scale"): ("image_proj.norm.weight", False),
    ("user_projector", "norm", "bias"): ("image_proj.norm.bias", False),
}

_FULL_PROJECTOR = {   # our leaf -> (IP-Adapter key, transpose); T > 1
    ("user_projector", "proj_0", "kernel"): ("image_proj.proj.0.weight", True),
    ("user_projector", "proj_0", "bias"): ("image_proj.proj.0.bias", False),
    ("user_projector", "proj_2", "kernel"): ("image_proj.proj.2.weight", True),
    ("user_projector", "proj_2", "bias"): ("image_proj.proj.2.bias", False),
    ("user_projector", "proj_3", "scale"): ("image_proj.proj.3.weight", False),
    ("user_projector", "proj_3", "bias"): ("image_proj.proj.3.bias", False),
}


def cross_attention_layers(cfg: unet_lib.UNetConfig) -> list[tuple[Path, int]]:
  """(attn2 module path under the PersonalizedUNet params, its channels), in diffusers' order.

  The order of `unet.attn_processors` restricted to attn2: down blocks, up blocks, mid block (see
  the module docstring); entry k is exported as `ip_adapter.<2k+1>`.
  """
  n = len(cfg.block_out_channels)
  layers = cfg.per_block("layers_per_block")
  t_layers = cfg.per_block("transformer_layers_per_block")
  out: list[tuple[Path, int]] = []

  def add(block: str, attentions: int, transformer_layers: int, channels: int):
    for a in range(attentions):
      for t in range(transformer_layers):
        out.append((("unet", block, f"attentions_{a}", f"transformer_blocks_{t}", "attn2"),
                    channels))

  for i, block_type in enumerate(cfg.down_block_types):
    if unet_lib.DOWN_BLOCKS[block_type].has_attention:
      add(f"down_blocks_{i}", layers[i], t_layers[i], cfg.block_out_channels[i])
  for i, block_type in enumerate(cfg.up_block_types):
    j = n - 1 - i   # the matching down block
    if unet_lib.UP_BLOCKS[block_type].has_attention:
      add(f"up_blocks_{i}", layers[j] + 1, t_layers[j], cfg.block_out_channels[j])
  add("mid_block", 1, t_layers[-1], cfg.block_out_channels[-1])
  return out


def single_token_projector(cfg: unet_lib.UNetConfig) -> bool:
  """True when the projector is ImageProjection-shaped (one-token embeddings, user_projector.py)."""
  return cfg.user_tokens == 1


def projector_shapes(cfg, token_dim: int) -> dict[Path, tuple[int, ...]]:
  """Every user_projector leaf -> its shape (user_projector.py): one-token (proj, norm) when
  cfg.user_tokens == 1, else Full (proj_0, proj_2, proj_3); token_dim = D, the token width."""
  e, d = cfg.user_embed_dim, token_dim
  if single_token_projector(cfg):
    kd = cfg.user_tokens_per_embedding * d
    shapes = {"proj": {"kernel": (e, kd), "bias": (kd,)}, "norm": {"scale": (d,), "bias": (d,)}}
  else:
    shapes = {"proj_0": {"kernel": (e, e), "bias": (e,)},
              "proj_2": {"kernel": (e, d), "bias": (d,)}, "proj_3": {"scale": (d,), "bias": (d,)}}
  return {("user_projector", m, leaf): shape for m, leaves in shapes.items()
          for leaf, shape in leaves.items()}


def _expected(cfg: unet_lib.UNetConfig) -> dict[Path, tuple[str, bool, tuple[int, ...]]]:
  """Every user-branch leaf -> (IP-Adapter key, transpose, our shape), in the file's key order."""
  d = cfg.cross_attention_dim
  projector = _SINGLE_TOKEN_PROJECTOR if single_token_projector(cfg) else _FULL_PROJECTOR
  shapes = projector_shapes(cfg, d)
  out = {path: (key, t, shapes[path]) for path, (key, t) in projector.items()}
  for k, (attn2, channels) in enumerate(cross_attention_layers(cfg)):
    for ours, theirs in (("to_k_user", "to_k_ip"), ("to_v_user", "to_v_ip")):
      out[attn2 + (ours, "kernel")] = (f"ip_adapter.{2 * k + 1}.{theirs}.weight", True,
                                       (d, channels))
  return out


def ip_adapter_state_dict(user_params: Mapping[str, Any],
                          unet_config: unet_lib.UNetConfig) -> dict[str, np.ndarray]:
  """User branch (`split_params(params)[1]`) -> IP-Adapter state dict, float32, PyTorch layouts.

  Keys: image_proj.proj.{weight,bias} + image_proj.norm.{weight,bias} (one-token embeddings) or
  image_proj.proj.{0,2,3}.{weight,bias} (Full), and ip_adapter.<2k+1>.to_{k,v}_ip.weight (numbering
  in the module docstring). A user-branch leaf that is missing, not expected by `unet_config`, or
  of the wrong shape is a WeightsError naming it: a silently misnumbered layer would load into
  diffusers without complaint and give wrong images. So is a token count K diffusers cannot load.
  """
  k = unet_config.user_tokens_per_embedding
  if single_token_projector(unet_config) and k != DIFFUSERS_IMAGE_PROJ_TOKENS:
    raise WeightsError(
        f"ip_adapter_state_dict: model.user_tokens_per_embedding={k}, but diffusers' IP-Adapter "
        f"loader builds ImageProjection with num_image_text_embeds={DIFFUSERS_IMAGE_PROJ_TOKENS} "
        f"for any image_proj.proj.weight (and takes cross_attention_dim as its rows // "
        f"{DIFFUSERS_IMAGE_PROJ_TOKENS}), so a file with {k} tokens fails to load there (size "
        f"mismatch); only runs with model.user_tokens_per_embedding="
        f"{DIFFUSERS_IMAGE_PROJ_TOKENS} can be exported")
  return convert_user_branch(user_params, _expected(unet_config), "ip_adapter_state_dict",
                             "this UNetConfig's")


def convert_user_branch(user_params: Mapping[str, Any],
                        expected: Mapping[Path, tuple[str, bool, tuple[int, ...]]],
                        what: str, whose: str) -> dict[str, np.ndarray]:
  """User-branch leaves -> {key: float32 array in PyTorch layout}, for exactly `expected`
  (path -> (key, transpose, our shape)): a missing, unexpected or misshaped leaf is a WeightsError
  naming it, since a silently misplaced layer would load without complaint and give wrong images."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(user_params))
  missing = [p for p in expected if p not in flat]
  extra = sorted(p for p in flat if p not in expected)
  wrong = [f"{'/'.join(p)} {tuple(np.shape(flat[p]))} != {shape}"
           for p, (_, _, shape) in expected.items()
           if p in flat and tuple(np.shape(flat[p])) != shape]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing user param(s): "
                    + ", ".join("/".join(p) for p in missing[:5]))
  if extra:
    problems.append(f"{len(extra)} unexpected param(s) (not in {whose} user branch): "
                    + ", ".join("/".join(p) for p in extra[:5]))
  if wrong:
    problems.append(f"{len(wrong)} param(s) of the wrong shape: {', '.join(wrong[:5])}")
  if problems:
    raise WeightsError(f"{what}: " + "; ".join(problems))
  out = {}
  for path, (key, transpose, _) in expected.items():
    value = np.asarray(flat[path], np.float32)
    out[key] = np.ascontiguousarray(value.T if transpose else value)
  return out


def atomic_write(path: str, write) -> None:
  """write(tmp_path) next to `path`, then os.replace: readers never see a half-written file.
  A URL (gs://...): write(tmp_path) in a local temporary folder, then one upload (storage.py)."""
  if storage.is_url(path):
    with tempfile.TemporaryDirectory() as folder:
      tmp = os.path.join(folder, os.path.basename(path))
      write(tmp)
      with open(tmp, "rb") as f:
        storage.write_bytes(path, f.read())
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 would hide the file from other users
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def metadata_path(weights_path: str) -> str:
  """ip-adapter_ppd.safetensors -> ip-adapter_ppd.json."""
  return os.path.splitext(weights_path)[0] + ".json"


def save_ip_adapter(path: str, state_dict: Mapping[str, np.ndarray],
                    metadata: Mapping[str, Any],
                    layer_suffix: str = "to_k_ip.weight") -> tuple[str, str]:
  """Writes `path` (.safetensors, diffusers' loader needs that suffix) and its JSON next to it.

  metadata: what using the file needs (user_embed_dim, user_tokens, cross_attention_dim, step,
  variant, usage...), written as <stem>.json and, as strings, into the safetensors header; the
  JSON also counts the attention layers (keys ending in layer_suffix: one per layer).
  Returns (weights path, JSON path).
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: the weights file must end in .safetensors (diffusers reads "
                     "other suffixes with torch.load)")
  tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
  header = {"format": "pt", **{k: v if isinstance(v, str) else json.dumps(v)
                               for k, v in metadata.items()}}
  atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
  info = dict(metadata, weight_name=os.path.basename(path), num_tensors=len(tensors),
              num_cross_attention_layers=sum(k.endswith(layer_suffix) for k in tensors))
  json_path = metadata_path(path)

  def write_json(tmp):
    with open(tmp, "w") as f:
      json.dump(info, f, indent=2)
      f.write("\n")
  atomic_write(json_path, write_json)
  return path, json_path


def export_metadata(unet_config: unet_lib.UNetConfig, *, step: int | None = None,
                    variant: str | None = None, base: str | None = None,
                    weight_name: str = "ip-adapter_ppd.safetensors",
                    folder: str = ".", workdir: str = "W",
                    sample: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The JSON's content: the embedding a caller must pass, where the run came from, the call
  (sampling as `sample`, the run's config.sample; None: configs/common.py's)."""
  sdxl = getattr(unet_config, "addition_embed_type", None) == "text_time"
  pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
  e, t = unet_config.user_embed_dim, unet_config.user_tokens
  single = single_token_projector(unet_config)
  if single:
    layout = ("diffusers IP-Adapter, ImageProjection (image_proj.proj, image_proj.norm; "
              f"{unet_config.user_tokens_per_embedding} tokens), to_k_ip/to_v_ip")
    embeds = f"[embeds]: embeds [2p, 1, {e}], negative rows first (CFG)"
  else:
    layout = "diffusers IP-Adapter, Full projection (image_proj.proj.0/2/3, to_k_ip/to_v_ip)"
    embeds = f"[embeds]: embeds [2p, 1, {t}, {e}], negative rows first (CFG)"
  return {
      "layout": layout,
      "user_embed_dim": e,
      "user_tokens": t,
      "user_tokens_per_embedding": unet_config.user_tokens_per_embedding if single else None,
      "cross_attention_dim": unet_config.cross_attention_dim,
      "ip_adapter_image_embeds": embeds + "; p = len(prompts)",
      "step": step,
      "variant": variant,
      "base": base,
      "usage": export_usage.usage_snippet(folder, weight_name, pipeline=pipeline,
                                          single_token=single, base=base or "BASE",
                                          workdir=workdir, sample=sample).splitlines(),
  }

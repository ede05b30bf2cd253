"""An open_clip checkpoint (HPSv2 / HPSv2.1) -> a transformers CLIPModel folder of safetensors.

  python -m ppd_jax.weights.convert_open_clip HPS_v2_compressed.pt OUT_DIR [--model_name=ViT-H-14]
      [--open_clip_config=FILE.json] [--tokenizer=FOLDER_OR_HUB_ID] [--overwrite]

HPS is published only as a torch pickle, `{'state_dict': ..., ...}` in open_clip's key layout.
Converting it once, here, means evaluation reads safetensors through the same reader as PickScore
and the CLIP rewards (weights/clip_folder.load_clip) and never unpickles anything or needs torch.
The pickle is read with torch's restricted unpickler only (weights/torch_pickle.py).

Key map, open_clip -> transformers (both store Linear weights [out, in]; E = embeddings):

    visual.class_embedding             -> vision_model.E.class_embedding
    visual.positional_embedding        -> vision_model.E.position_embedding.weight
    visual.conv1.weight                -> vision_model.E.patch_embedding.weight
    visual.ln_pre.* / visual.ln_post.* -> vision_model.pre_layrnorm.* / .post_layernorm.*
    visual.proj [Cv, P]                -> visual_projection.weight = proj^T      (x @ proj)
    [visual.]transformer.resblocks.N.  -> {vision,text}_model.encoder.layers.N.
        ln_1 / ln_2                    ->   layer_norm1 / layer_norm2
        attn.in_proj_weight [3C, C]    ->   self_attn.{q,k,v}_proj.weight (rows [q; k; v], as
        attn.in_proj_bias [3C]         ->   self_attn.{q,k,v}_proj.bias    torch's MHA stacks them)
        attn.out_proj                  ->   self_attn.out_proj
        mlp.c_fc / mlp.c_proj          ->   mlp.fc1 / mlp.fc2
    token_embedding.weight             -> text_model.E.token_embedding.weight
    positional_embedding               -> text_model.E.position_embedding.weight
    ln_final.*                         -> text_model.final_layer_norm.*
    text_projection [Ct, P]            -> text_projection.weight = text_projection^T
    logit_scale                        -> logit_scale   (the log of the scale in both)

`attn_mask` (the text tower's causal mask, a buffer some open_clip versions saved) is dropped; any
other key (layer scale ls_1/ls_2, attn_pool, CustomTextCLIP's text.*) is an error naming it. The
architecture comes from open_clip's own model-config JSON (model_configs/ViT-H-14.json); the text
tower pools at argmax(ids), open_clip's `text.argmax(-1)`, which transformers keeps for configs
with eos_token_id == 2 (clip_text.eos_positions). Tensors keep their dtype (HPS is fp16);
clip_folder.load_clip casts to float32.
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from ppd_jax import cli_logging
from ppd_jax.models import clip
from ppd_jax.weights import convert
from ppd_jax.weights import open_clip_config
from ppd_jax.weights import torch_pickle

LAYOUT = "open_clip"

_FIXED = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
          "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
          "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
          "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
          "positional_embedding": "text_model.embeddings.position_embedding.weight",
          "logit_scale": "logit_scale"}
for _p in ("weight", "bias"):
  _FIXED.update({f"visual.ln_pre.{_p}": f"vision_model.pre_layrnorm.{_p}",
                 f"visual.ln_post.{_p}": f"vision_model.post_layernorm.{_p}",
                 f"ln_final.{_p}": f"text_model.final_layer_norm.{_p}"})
_TRANSPOSED = {"visual.proj": "visual_projection.weight",
               "text_projection": "text_projection.weight"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_DROPPED = {"attn_mask"}


def _block_key(key: str) -> tuple[str, str] | None:
  """'[visual.]transformer.resblocks.N.rest' -> ('{vision,text}_model.encoder.layers.N', rest)."""
  tower, _, rest = key.partition("transformer.resblocks.")
  if tower not in ("", "visual.") or not rest:
    return None
  index, _, rest = rest.partition(".")
  if not index.isdigit():
    return None
  model = "vision_model" if tower else "text_model"
  return f"{model}.encoder.layers.{index}", rest


def to_transformers_keys(state: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
  """open_clip-named arrays -> transformers CLIPModel-named arrays (views: nothing is copied)."""
  out, unknown = {}, []
  for key, value in state.items():
    if key in _DROPPED:
      continue
    if key in _FIXED:
      out[_FIXED[key]] = value
      continue
    if key in _TRANSPOSED:
      out[_TRANSPOSED[key]] = value.T if value.ndim == 2 else value   # else: to_flax's shape error
      continue
    block = _block_key(key)
    if block is None:
      unknown.append(key)
      continue
    prefix, rest = block
    module, _, leaf = rest.rpartition(".")
    if module == "attn" and leaf in ("in_proj_weight", "in_proj_bias"):
      if value.shape[0] % 3:
        raise convert.WeightsError(f"{what}: {key} has {value.shape[0]} rows, not 3 x hidden")
      name = leaf[len("in_proj_"):]
      for part, chunk in zip(("q", "k", "v"), np.split(value, 3, axis=0)):
        out[f"{prefix}.self_attn.{part}_proj.{name}"] = chunk
    elif module in _BLOCK and leaf in ("weight", "bias"):
      out[f"{prefix}.{_BLOCK[module]}.{leaf}"] = value
    else:
      unknown.append(key)
  if unknown:
    raise convert.WeightsError(
        f"{what}: {len(unknown)} key(s) outside the plain open_clip CLIP ViT layout (layer scale, "
        f"attentional pooling, a custom text tower?): {', '.join(sorted(unknown)[:5])}")
  return out


def check(state: dict[str, np.ndarray], config: clip.CLIPConfig, what: str) -> dict:
  """Map open_clip keys and check every key and shape against CLIPModel(config)'s param tree,
  before anything is written; returns the transformers-named arrays (still views)."""
  mapped = to_transformers_keys(state, what)
  convert.to_flax(mapped, clip.init_shapes(clip.CLIPModel(config)), what=what, dtype=None)
  return mapped


def _tokenizer(name: str | None):
  if name is None:
    return None
  try:
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(name)
  except Exception as e:  # noqa: BLE001 - missing files, hub errors, no transformers alike
    raise convert.WeightsError(f"--tokenizer={name!r}: cannot load a CLIP tokenizer ({e})") from e


def _c_order(x: np.ndarray) -> np.ndarray:
  """safetensors writes C-ordered buffers; the transposed projections are views. (Not
  np.ascontiguousarray: it turns the 0-d logit_scale into shape (1,).)"""
  return x if x.flags.c_contiguous else np.copy(x, order="C")


def _save_tokenizer(tok, folder: str) -> None:
  """save_pretrained, plus vocab.json and merges.txt (transformers 5 writes only tokenizer.json;
  clip_folder.load_tokenizer and older readers look for the two BPE files), from the BPE model."""
  tok.save_pretrained(folder)
  model = json.loads(tok.backend_tokenizer.to_str())["model"]
  if not os.path.exists(os.path.join(folder, "vocab.json")):
    with open(os.path.join(folder, "vocab.json"), "w") as f:
      json.dump(model["vocab"], f, ensure_ascii=False)
  if not os.path.exists(os.path.join(folder, "merges.txt")):
    pairs = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    with open(os.path.join(folder, "merges.txt"), "w") as f:
      f.write("\n".join(["#version: 0.2", *pairs]) + "\n")


def _replace_dir(tmp: str, out_dir: str) -> None:
  """Move the finished tmp folder to out_dir (an old out_dir is moved aside first, then removed)."""
  old = None
  if os.path.lexists(out_dir):
    old = f"{tmp}.old"
    os.rename(out_dir, old)
  os.rename(tmp, out_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def convert_checkpoint(in_path: str, out_dir: str, model_name: str = "ViT-H-14",
                       config_file: str | None = None, tokenizer: str | None = None,
                       overwrite: bool = False) -> dict:
  """Read, map, check, then write OUT_DIR/{model.safetensors, config.json, conversion.json} (+
  tokenizer files). Returns conversion.json's content. Nothing is written if any check fails."""
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
  if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not a folder")
  oc_config, name = open_clip_config.resolve(model_name, config_file)
  config = open_clip_config.to_clip_config(oc_config, name)
  state = torch_pickle.load_state_dict(in_path)
  mapped = check(state, config, in_path)
  tok = _tokenizer(tokenizer)
  digest = torch_pickle.sha256(in_path)
  dtypes = sorted({str(v.dtype) for v in mapped.values()})
  record = {"layout": LAYOUT, "converter": "ppd_jax.weights.convert_open_clip",
            "source": os.path.basename(in_path), "source_sha256": digest,
            "source_bytes": os.path.getsize(in_path), "model_name": name,
            "open_clip_config": oc_config, "dtypes": dtypes,
            "num_params": int(sum(v.size for v in mapped.values())), "tokenizer": tokenizer}

  from safetensors.numpy import save_file
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".partial", dir=parent)
  try:
    save_file({k: _c_order(v) for k, v in mapped.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt", "source_sha256": digest, "layout": LAYOUT})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config.to_transformers(), f, indent=2)
    with open(os.path.join(tmp, "conversion.json"), "w") as f:
      json.dump(record, f, indent=2)
    if tok is not None:
      _save_tokenizer(tok, tmp)
    _replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return record


def _define_flags():
  """Defined only when run as a script, so tests can import this module beside other CLIs."""
  from absl import flags
  flags.DEFINE_string("model_name", "ViT-H-14", "built-in open_clip architecture: "
                      + ", ".join(sorted(open_clip_config.BUILTIN)))
  flags.DEFINE_string("open_clip_config", None, "an open_clip model-config JSON file (overrides "
                      "--model_name)")
  flags.DEFINE_string("tokenizer", None, "a CLIP tokenizer folder or hub id to save beside the "
                      "weights (open_clip's BPE is CLIP's, e.g. "
                      "laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
  flags.DEFINE_bool("overwrite", False, "replace an existing non-empty OUT_DIR")


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import app
  from absl import flags
  if len(argv) != 3:
    raise app.UsageError("usage: python -m ppd_jax.weights.convert_open_clip IN.pt OUT_DIR "
                         "[--model_name=...] [--open_clip_config=FILE] [--tokenizer=...]")
  f = flags.FLAGS
  try:
    record = convert_checkpoint(argv[1], argv[2], f.model_name, f.open_clip_config, f.tokenizer,
                                f.overwrite)
  except (convert.WeightsError, ValueError, OSError) as e:
    sys.exit(f"ppd_jax.weights.convert_open_clip: {e}")
  print(f"wrote {argv[2]}: {record['model_name']}, {record['num_params'] / 1e6:.1f}M params, "
        f"{'/'.join(record['dtypes'])}, source sha256 {record['source_sha256']}")


if __name__ == "__main__":
  from absl import app as _app
  _define_flags()
  _app.run(main)

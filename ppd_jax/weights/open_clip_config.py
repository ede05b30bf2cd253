"""open_clip's model-config JSON (open_clip/model_configs/*.json) -> our clip.CLIPConfig.

The converter (weights/convert_open_clip.py) needs the architecture of a checkpoint that carries
none: HPS's `.pt` holds only tensors. open_clip names it (`create_model('ViT-H-14')`) and keeps its
shape in a small JSON file; this reads that schema, so any plain open_clip ViT CLIP can be given as
`--open_clip_config=FILE.json`, and the published ones are built in.

    {"embed_dim": P, "quick_gelu": false,
     "vision_cfg": {"image_size", "layers", "width", "head_width": 64, "mlp_ratio": 4.0,
                    "patch_size"},
     "text_cfg": {"context_length", "vocab_size", "width", "heads": 8, "layers", "mlp_ratio": 4.0}}

    intermediate_size   = int(width * mlp_ratio)           (open_clip's mlp_width)
    vision heads        = width // head_width
    hidden_act          = "quick_gelu" if quick_gelu else "gelu" (exact erf), both towers
    text eos_token_id   = 2: pooling at argmax(ids), as open_clip's text.argmax(-1)
    layer_norm_eps      = 1e-5 (torch's LayerNorm default, which open_clip uses)

Defaults are those of open_clip's CLIPVisionCfg / CLIPTextCfg. Fields that change the computation
away from the plain CLIP ViT (layer scale, attentional pooling, no ln_pre, a timm or HF tower, ...)
are refused by name unless they hold their plain value; unknown fields are refused too.
"""
import json
import math
from typing import Any, Mapping

from ppd_jax.models import clip
from ppd_jax.models import clip_text
from ppd_jax.models import clip_vision


def _builtin(embed, image, v_layers, v_width, head_width, t_width, t_heads, t_layers,
             mlp_ratio=None, quick_gelu=False):
  vision = {"image_size": image, "layers": v_layers, "width": v_width, "patch_size": 14}
  if head_width is not None:   # ViT-L-14's files leave it at the default, 64
    vision["head_width"] = head_width
  if mlp_ratio is not None:
    vision["mlp_ratio"] = mlp_ratio
  out = {"embed_dim": embed, "vision_cfg": vision,
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": t_width,
                      "heads": t_heads, "layers": t_layers}}
  if quick_gelu:
    out["quick_gelu"] = True
  return out


# open_clip 3.3.0's model_configs/<name>.json (tests compare them with the installed files).
# "ViT-L-14" is the LAION-trained layout (gelu); OpenAI's ViT-L/14 weights (clip.PRESETS's
# "ViT-L-14", the aesthetic predictor's tower) were trained with quick_gelu: "ViT-L-14-quickgelu".
BUILTIN = {
    "ViT-L-14": _builtin(768, 224, 24, 1024, None, 768, 12, 12),
    "ViT-L-14-quickgelu": _builtin(768, 224, 24, 1024, None, 768, 12, 12, quick_gelu=True),
    "ViT-H-14": _builtin(1024, 224, 32, 1280, 80, 1024, 16, 24),
    "ViT-bigG-14": _builtin(1280, 224, 48, 1664, 104, 1280, 20, 32, mlp_ratio=4.9231),
}

_VISION = {"image_size": 224, "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0,
           "patch_size": 16}
_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
         "mlp_ratio": 4.0}
# Accepted only at these (plain CLIP) values; anything else changes the computation.
_PLAIN_VISION = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                 "pool_type": "tok", "final_ln_after_pool": False, "pos_embed_type": "learnable",
                 "patch_dropout": 0.0, "output_tokens": False}
_PLAIN_TEXT = {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
               "pool_type": "argmax", "proj_bias": False, "proj_type": "linear",
               "final_ln_after_pool": False, "output_tokens": False, "pad_id": 0}
_PLAIN_TOP = {"custom_text": False, "init_logit_bias": None}


def resolve(model_name: str, config_file: str | None) -> tuple[dict, str]:
  """(open_clip config dict, its name): --open_clip_config's file if given, else a built-in."""
  if config_file is not None:
    try:
      with open(config_file) as f:
        return json.load(f), config_file
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"--open_clip_config={config_file!r}: not readable JSON ({e})") from e
  if model_name not in BUILTIN:
    raise ValueError(f"--model_name={model_name!r}: not a built-in open_clip architecture "
                     f"({', '.join(sorted(BUILTIN))}); pass --open_clip_config=FILE.json")
  return json.loads(json.dumps(BUILTIN[model_name])), model_name


def _fields(cfg: Mapping[str, Any], defaults: dict, plain: dict, where: str) -> dict:
  for key, value in cfg.items():
    if key in plain and value != plain[key]:
      raise ValueError(f"{where}.{key}={value!r}: not supported (the converter maps the plain "
                       f"CLIP ViT layout, {key}={plain[key]!r})")
    if key not in defaults and key not in plain:
      raise ValueError(f"{where}.{key}: unknown or unsupported open_clip field")
  out = {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}
  for key in ("image_size", "layers", "width", "heads", "patch_size", "head_width",
              "context_length", "vocab_size"):
    if key in out and not (isinstance(out[key], int) and out[key] > 0):
      raise ValueError(f"{where}.{key}={out[key]!r}: expected a positive integer")
  return out


def to_clip_config(cfg: Mapping[str, Any], name: str) -> clip.CLIPConfig:
  """An open_clip model config -> clip.CLIPConfig; errors name `name` and the field."""
  if not isinstance(cfg, Mapping):
    raise ValueError(f"{name}: an open_clip model config is a JSON object")
  for key, value in cfg.items():
    if key in _PLAIN_TOP and value != _PLAIN_TOP[key]:
      raise ValueError(f"{name}: {key}={value!r} is not supported (plain CLIP only)")
    if key not in {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", *_PLAIN_TOP}:
      raise ValueError(f"{name}: {key}: unknown or unsupported open_clip field")
  for key in ("embed_dim", "vision_cfg", "text_cfg"):
    if key not in cfg:
      raise ValueError(f"{name}: {key} is missing")
  v = _fields(cfg["vision_cfg"], _VISION, _PLAIN_VISION, f"{name}: vision_cfg")
  t = _fields(cfg["text_cfg"], _TEXT, _PLAIN_TEXT, f"{name}: text_cfg")
  act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
  if v["width"] % v["head_width"]:
    raise ValueError(f"{name}: vision_cfg.width={v['width']} is not a multiple of head_width="
                     f"{v['head_width']}")
  try:
    text = clip_text.CLIPTextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["width"],
        intermediate_size=int(t["width"] * t["mlp_ratio"]), num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
        hidden_act=act, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2)
    vision = clip_vision.CLIPVisionConfig(
        hidden_size=v["width"], intermediate_size=int(v["width"] * v["mlp_ratio"]),
        num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v["head_width"],
        image_size=v["image_size"], patch_size=v["patch_size"], hidden_act=act,
        layer_norm_eps=1e-5)
    return clip.CLIPConfig(text, vision, projection_dim=cfg["embed_dim"],
                           logit_scale_init_value=math.log(1 / 0.07))
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from e

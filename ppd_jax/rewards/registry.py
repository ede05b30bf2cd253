"""The reward models by name: their weights, tokenizer and formula, and `load(name, ...)`.

| name      | model (default weights)                         | score                       | scale      |
|-----------|-------------------------------------------------|-----------------------------|------------|
| pickscore | yuvalkirstain/PickScore_v1 (CLIP ViT-H/14)      | exp(logit_scale) * cos      | ~18-23     |
| hps_v2    | HPS_v2_compressed.pt (open_clip ViT-H-14)       | cos                         | ~0.25-0.33 |
| hps_v21   | HPS_v2.1_compressed.pt (open_clip ViT-H-14)     | cos                         | ~0.25-0.33 |
| clip_l14  | openai/clip-vit-large-patch14                   | 100 * max(cos, 0)           | 0-100      |
| clip_h14  | laion/CLIP-ViT-H-14-laion2B-s32B-b79K           | cos                         | ~0.3-0.4   |
| aesthetic | openai/clip-vit-large-patch14 + LAION v2 head   | head(v / |v|)               | ~1-10      |

HPS is reported as the bare cosine; the HPSv2 paper and PPD's tables print it x 100. clip_l14 is
torchmetrics' CLIP score; clip_h14 is the CLIP reward of Diffusion-DPO (and so of PPD's synthetic
"CLIP" user). The HPS checkpoints ship only as open_clip pickles: convert once with
`python -m ppd_jax.weights.convert_open_clip` and pass the folder as `model`. Where a folder has no
tokenizer (a converted checkpoint), the LAION ViT-H/14 tokenizer is used: open_clip's BPE is
CLIP's, and its zero padding sits after the EOS, which causal attention never lets the pooled
EOS token see. hps_v2, hps_v21 and clip_h14 are open_clip models: their prompts are cleaned as
open_clip's tokenizer does (ftfy, HTML unescape; clip_similarity.open_clip_text) before BPE.
`model` and `aesthetic_head` may be URLs (gs://...; rewards/remote.py).
"""
import dataclasses
from typing import Callable

from ppd_jax import file_hashes
from ppd_jax import storage
from ppd_jax.rewards import aesthetic
from ppd_jax.rewards import clip_similarity
from ppd_jax.rewards import remote
from ppd_jax.weights import aesthetic_head as aesthetic_weights
from ppd_jax.weights import clip_folder
from ppd_jax.weights import hf_folder

LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_L14 = "openai/clip-vit-large-patch14"


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  model: str | None            # default weights (hub id); None: the user must convert and pass them
  formula: Callable | None     # clip_similarity formula; None for the aesthetic reward
  tokenizer: str = LAION_H14   # used when the model folder has no tokenizer
  source: str = ""             # where the weights come from and their licence (docs/rewards.md table)
  open_clip: bool = False      # an open_clip model: prompts cleaned as its tokenizer does


SPECS = {
    "pickscore": RewardSpec("yuvalkirstain/PickScore_v1", clip_similarity.scaled_cosine,
                            source="hub yuvalkirstain/PickScore_v1 (model.safetensors); code MIT, "
                                   "no licence tag on the weights"),
    "hps_v2": RewardSpec(None, clip_similarity.cosine, open_clip=True,
                         source="hub xswu/HPSv2 HPS_v2_compressed.pt (Apache-2.0), converted"),
    "hps_v21": RewardSpec(None, clip_similarity.cosine, open_clip=True,
                          source="hub xswu/HPSv2 HPS_v2.1_compressed.pt (Apache-2.0), converted"),
    "clip_l14": RewardSpec(OPENAI_L14, clip_similarity.clip_score, tokenizer=OPENAI_L14,
                           source=f"hub {OPENAI_L14} (MIT code; OpenAI model card: research use)"),
    "clip_h14": RewardSpec(LAION_H14, clip_similarity.cosine, open_clip=True,
                           source=f"hub {LAION_H14} (MIT)"),
    "aesthetic": RewardSpec(OPENAI_L14, None, tokenizer=OPENAI_L14,
                            source="christophschuhmann/improved-aesthetic-predictor "
                                   "sac+logos+ava1-l14-linearMSE.pth (Apache-2.0) on the "
                                   f"{OPENAI_L14} image tower"),
}
NAMES = tuple(SPECS)


class RewardConfigError(ValueError):
  """A reward name or weight setting that cannot work; the message names the flag."""


def _local(model: str) -> str:
  """A URL's model folder as its local copy (remote.local_folder); anything else as it is."""
  if not storage.is_url(model):
    return model
  try:
    return remote.local_folder(model)
  except remote.RemoteWeightsError as e:
    raise RewardConfigError(str(e)) from None


def load(name: str, model: str | None = None, aesthetic_head: str | None = None,
         tokenizer: str | None = None, batch_size: int = 32, workers: int | None = None):
  """The reward `name` with weights from `model` (a transformers CLIP folder, a converted
  open_clip folder or a hub id; default: the reward's own) and, for `aesthetic`, the head file
  `aesthetic_head` (.pth or converted .safetensors)."""
  if name not in SPECS:
    raise RewardConfigError(f"--reward={name!r}: unknown reward (one of {', '.join(NAMES)})")
  spec = SPECS[name]
  model = model or spec.model
  if model is None:
    raise RewardConfigError(
        f"--reward={name}: pass --model=FOLDER, the checkpoint converted with `python -m "
        f"ppd_jax.weights.convert_open_clip IN.pt FOLDER` (weights: {spec.source})")
  if model.endswith((".pt", ".pth", ".bin", ".ckpt")):
    raise RewardConfigError(f"--model={model}: a pickle-format file; convert it once with "
                            "`python -m ppd_jax.weights.convert_open_clip IN.pt OUT_DIR` and "
                            "pass OUT_DIR")
  if name == "aesthetic":
    if not aesthetic_head:
      raise RewardConfigError("--reward=aesthetic needs --aesthetic_head=PATH "
                              f"({spec.source})")
    vision, vision_params = clip_folder.load_vision(_local(model))
    dim = vision.config.projection_dim
    if storage.is_url(aesthetic_head):
      try:
        head = remote.aesthetic_head(aesthetic_head, dim)
      except remote.RemoteWeightsError as e:
        raise RewardConfigError(str(e)) from None
    else:
      head = aesthetic_weights.load(aesthetic_head, input_dim=dim)
    return aesthetic.AestheticReward(vision, vision_params, head, batch_size, workers)
  if aesthetic_head:
    raise RewardConfigError(f"--aesthetic_head is only for --reward=aesthetic, not {name}")
  folder = hf_folder.resolve_model(_local(model))
  module, params = clip_folder.load_clip(folder)
  tok = clip_folder.load_tokenizer(folder, fallback=spec.tokenizer, override=tokenizer)
  clean = clip_similarity.open_clip_text if spec.open_clip else None
  return clip_similarity.ClipSimilarityReward(name, module, params, tok, spec.formula,
                                              batch_size, workers, clean)


def identity(name: str, model: str | None = None, aesthetic_head: str | None = None) -> dict:
  """What a loaded reward is, for evaluation manifests and score files (evals/manifest.py): its
  name, where its weights came from and the SHA-256 of each weight file, so that a score made
  with other weights is never reused."""
  model = model or SPECS[name].model
  out = {"name": name, "model": model,
         "weights_sha256": file_hashes.weights_sha256(hf_folder.resolve_model(_local(model)))}
  if aesthetic_head:
    out["aesthetic_head"] = aesthetic_head
    out["aesthetic_head_sha256"] = file_hashes.file_sha256(aesthetic_head)
  return out

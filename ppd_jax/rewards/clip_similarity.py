"""Rewards that compare an image with its prompt in a CLIP model's joint space.

    cos = <v / |v|, t / |t|>,   v = image features, t = text features of the prompt
    score = formula(cos, exp(logit_scale))

PickScore is exp(logit_scale) * cos, HPSv2 and Diffusion-DPO's CLIP reward the bare cos, and
torchmetrics' CLIP score 100 * max(cos, 0) (rewards/registry.py has each one's weights and
formula). Images go through the CLIP preprocessing (shortest side to the model's size, bicubic,
centre crop, CLIP mean/std); prompts through the model's CLIP tokenizer, padded to its 77
positions with an attention mask and truncated as transformers does (the EOS is kept). Text
embeddings are computed once per distinct prompt of a call, so scoring many images of one prompt
costs one text forward pass.

Rewards published as open_clip models (HPSv2, LAION's CLIP-H) first clean the prompt as
open_clip's tokenizer does (`open_clip_text`). transformers' CLIPTokenizer only applies NFC,
collapses whitespace and lower-cases, so without it a curly apostrophe or an "&amp;" gives other
tokens than the model saw in training; PickScore and torchmetrics' CLIP score tokenise with
transformers and keep its behaviour.
"""
import html
from typing import Any, Callable, Sequence

import ftfy
import numpy as np

from ppd_jax.rewards import base
from ppd_jax.rewards import preprocess
from ppd_jax.models import clip

Formula = Callable[[np.ndarray, float], np.ndarray]


class ClipSimilarityReward:
  """score(images, prompts) -> [N] = formula(cos(image, prompt), exp(logit_scale))."""

  def __init__(self, name: str, module: clip.CLIPModel, params: dict, tokenizer: Any,
               formula: Formula, batch_size: int = 32, workers: int | None = None,
               clean: Callable[[str], str] | None = None):
    self.name, self.module, self.tokenizer, self.formula = name, module, tokenizer, formula
    self.clean = clean
    self.workers = workers
    self.runner = base.ShardedBatches(params, batch_size)
    self.logit_scale_exp = float(np.exp(np.asarray(params["logit_scale"], np.float64)))
    self._image_fn = lambda p, x: clip.normalize(
        module.apply({"params": p}, x, method=clip.CLIPModel.get_image_features))
    self._text_fn = lambda p, ids, mask: clip.normalize(
        module.apply({"params": p}, ids, mask, method=clip.CLIPModel.get_text_features))

  def pixels(self, images) -> np.ndarray:
    size = self.module.config.vision.image_size
    return preprocess.clip_pixels(images, size, workers=self.workers)

  def image_embeddings(self, pixels: np.ndarray) -> np.ndarray:
    """[N, P] unit-norm image embeddings of preprocessed pixels [N, S, S, 3]."""
    return self.runner(self._image_fn, pixels)

  def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
    """[N, P] unit-norm text embeddings."""
    length = self.module.config.text.max_position_embeddings
    tokens = tokenize(self.tokenizer, prompts, length, self.clean)
    return self.runner(self._text_fn, tokens["input_ids"].astype(np.int32),
                       tokens["attention_mask"].astype(np.int32))

  def cosines(self, images, prompts: Sequence[str]) -> np.ndarray:
    pixels = self.pixels(images)
    prompts = base.check_prompts(len(pixels), prompts)
    if not prompts:
      return np.zeros((0,), np.float32)
    distinct, index = np.unique(np.asarray(prompts, dtype=object), return_inverse=True)
    text = self.text_embeddings([str(p) for p in distinct])[index]
    return np.sum(self.image_embeddings(pixels) * text, axis=-1, dtype=np.float32)

  def score(self, images, prompts: Sequence[str]) -> np.ndarray:
    return np.asarray(self.formula(self.cosines(images, prompts), self.logit_scale_exp),
                      np.float32)


def open_clip_text(text: str) -> str:
  """open_clip's cleaning before BPE (open_clip/tokenizer.py, basic_clean then whitespace_clean):
  ftfy.fix_text (curly quotes straightened, mojibake repaired, NFC), HTML entities unescaped twice,
  whitespace runs collapsed to one space. Its lower-casing the CLIP tokenizer does itself."""
  return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def tokenize(tokenizer: Any, prompts: Sequence[str], length: int,
             clean: Callable[[str], str] | None = None) -> dict:
  """{"input_ids", "attention_mask"} [N, length] of `prompts`, each cleaned by `clean` first."""
  texts = [clean(p) for p in prompts] if clean else list(prompts)
  return tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                   return_tensors="np")


def scaled_cosine(cos: np.ndarray, logit_scale_exp: float) -> np.ndarray:
  """PickScore: exp(logit_scale) * cos (PickScore_v1's exp(logit_scale) is about 100)."""
  return logit_scale_exp * cos


def cosine(cos: np.ndarray, logit_scale_exp: float) -> np.ndarray:
  """HPSv2 / Diffusion-DPO's CLIP reward: the bare cosine, in [-1, 1]."""
  return cos


def clip_score(cos: np.ndarray, logit_scale_exp: float) -> np.ndarray:
  """torchmetrics' CLIPScore: 100 * max(cos, 0), in [0, 100]."""
  return 100.0 * np.maximum(cos, 0.0)


"""A local transformers VLM as the judge, read from its next-token probabilities rather than from
parsed text. The family follows the checkpoint's config.json model_type (FAMILIES):
LLaVA-OneVision (users/vlm.py, the default checkpoint) or Qwen2-VL (users/qwen2_vl.py). Both are a
users/vlm.ChatVLM, whose inputs() spells the images the family's way; everything below is shared.

The judge prompt (evals/judge_prompt.py) is closed with the assistant turn opened and the answer
prefix "Prediction of user preference: " already written; at the last position the logits l give

    p_first = softmax(l[id_1], l[id_2])[0],     mass = softmax(l)[id_1] + softmax(l)[id_2]

(a low mass: the model wanted to say something else). id_1 and id_2 are taken from the tokenizer,
not hard-coded: prefix + "1" and prefix + "2" must tokenise to the prefix's own tokens plus one
token each, else the tokenizer is refused by name. Requests go in batches (a question's two
orders side by side: same length, no padding between them); rows are left-padded, so every row's
last token is at [-1].

With cot=True the model first writes Table 2's reasoning (users/vlm.Decoding: sampled at the
paper's temperature or greedy, seeded per batch); the reply is cut at its last answer marker (or
the marker appended), and one forward pass over prompt + reasoning + prefix reads the answer.
"""
import numpy as np
from PIL import Image

from ppd_jax.evals import judge as judge_lib
from ppd_jax.evals import judge_prompt
from ppd_jax.users import qwen2_vl
from ppd_jax.users import vlm as vlm_lib

# config.json's model_type -> the wrapper that loads it.
FAMILIES = {"llava_onevision": vlm_lib.VLM, qwen2_vl.MODEL_TYPE: qwen2_vl.Qwen2VL}


def model_type(model_id: str) -> str | None:
  """The model_type of a hub id's or a folder's config.json, read without building the model."""
  import transformers
  try:
    config, _ = transformers.PreTrainedConfig.get_config_dict(model_id)
  except (OSError, ValueError) as e:
    raise ValueError(f"--judge_model={model_id}: no readable config.json: {e}") from e
  return config.get("model_type")


def load_vlm(model_id: str, *, dtype: str = "auto",
             device: str | None = None) -> vlm_lib.ChatVLM:
  """The checkpoint, loaded by the family its model_type names."""
  kind = model_type(model_id)
  if kind not in FAMILIES:
    raise ValueError(f"--judge_model={model_id}: model_type {kind!r} is not a local judge family "
                     f"(supported: {', '.join(FAMILIES)})")
  return FAMILIES[kind].load(model_id, dtype=dtype, device=device)


def answer_token_ids(tokenizer, prefix: str = judge_prompt.ANSWER_PREFIX) -> tuple[int, int]:
  """The single tokens that follow `prefix` for "1" and "2" (module docstring)."""
  base = tokenizer.encode(prefix, add_special_tokens=False)
  ids = []
  for digit in "12":
    full = tokenizer.encode(prefix + digit, add_special_tokens=False)
    if full[:-1] != base or len(full) != len(base) + 1:
      raise ValueError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} does not "
                       f"spell {prefix!r} + {digit!r} as the prefix's tokens plus one: the judge "
                       "cannot read the answer from one next-token distribution")
    ids.append(full[-1])
  if ids[0] == ids[1]:
    raise ValueError("the tokenizer gives '1' and '2' the same token after the answer prefix")
  return ids[0], ids[1]


def _pil(image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  from ppd_jax import images as image_io
  a = np.asarray(image)
  return Image.fromarray(a if a.dtype == np.uint8 else image_io.to_uint8(a))


class LocalJudge:
  """judge.Backend over a loaded users/vlm.ChatVLM (either family)."""

  def __init__(self, vlm: vlm_lib.ChatVLM, *, cot: bool = False,
               decoding: vlm_lib.Decoding = vlm_lib.Decoding(temperature=1.0),
               batch_size: int = 2):
    self.vlm, self.cot, self.decoding, self.batch_size = vlm, cot, decoding, max(1, batch_size)
    self.id_1, self.id_2 = answer_token_ids(vlm.tokenizer)
    self.name = f"local:{vlm.model_id}"

  def describe(self) -> dict:
    return {"backend": "local", **self.vlm.describe(), "cot": self.cot,
            "decoding": self.decoding.as_dict() if self.cot else None,
            "template": judge_prompt.TEMPLATE_VERSION, "answer_ids": [self.id_1, self.id_2]}

  def prompts_of(self, requests) -> list[tuple[list, list]]:
    out = []
    for r in requests:
      q = r.question
      segments, images = judge_prompt.judge_prompt(q.context, q.caption, r.first, r.second,
                                                   self.cot)
      out.append((segments, [_pil(im) for im in images]))
    return out

  def answer(self, requests) -> list[judge_lib.Answer]:
    out = []
    for start in range(0, len(requests), self.batch_size):
      batch = self.prompts_of(requests[start:start + self.batch_size])
      reasoning = self._reason(batch, start) if self.cot else [""] * len(batch)
      suffixes = [r + judge_prompt.ANSWER_PREFIX for r in reasoning]
      out += [judge_lib.Answer(p, text=r, mass=m)
              for (p, m), r in zip(self.read(batch, suffixes), reasoning)]
    return out

  def read(self, batch, suffixes) -> list[tuple[float, float]]:
    """(p_first, mass) per prompt from the next-token logits after its suffix."""
    import torch
    inputs = self.vlm.inputs(batch, suffixes=suffixes)
    with torch.inference_mode():
      logits = self.vlm.model(**inputs).logits[:, -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    two = logp[:, [self.id_1, self.id_2]]
    p_first = torch.softmax(two, dim=-1)[:, 0]
    mass = two.exp().sum(-1)
    return list(zip(p_first.tolist(), mass.tolist()))

  def _reason(self, batch, start: int) -> list[str]:
    """The chain of thought, cut before its last answer marker (so the forward pass reads the
    digit itself); a reply without a marker is kept whole and the prefix appended."""
    inputs = self.vlm.inputs(batch)
    seqs = self.vlm.generate(inputs, self.decoding, vlm_lib.batch_seed(self.decoding.seed,
                                                                       f"judge:{start}"))
    new = seqs[:, inputs["input_ids"].shape[1]:]
    texts = [self.vlm.tokenizer.decode(row, skip_special_tokens=True) for row in new]
    marker = judge_prompt.ANSWER_PREFIX.rstrip()
    out = []
    for t in texts:
      head, sep, _ = t.rpartition(marker)
      out.append(head if sep else (t.rstrip() + "\n"))
    return out

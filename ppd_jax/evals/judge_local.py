"""A local transformers VLM as the judge. The family follows the checkpoint's config.json
model_type (FAMILIES): LLaVA-OneVision (users/vlm.py, the default checkpoint) or Qwen2-VL
(users/qwen2_vl.py). Both are a users/vlm.ChatVLM, whose inputs() spells the images the family's
way; everything below is shared.

With cot=True (the paper's protocol, the default) the model first writes Table 2's reasoning
(users/vlm.Decoding: sampled at the given temperature or greedy, torch-seeded per batch from the
decoding's seed). The verdict then comes from one of (`verdict_from`):

  "text"      the paper: the reply is sampled to its end and its last "Prediction of user
              preference: 1|2" (judge_prompt.answer_in, as the API judge parses) decides,
              p_first = 1 or 0. A reply without it is invalid. Without cot the reply is sampled
              from the bare prediction request the same way.
  "logprobs"  the next-token distribution after the answer prefix (with cot: after the reasoning,
              cut at its last answer marker or with the marker appended): one forward pass over
              prompt [+ reasoning] + "Prediction of user preference: " gives logits l,

              p_first = softmax(l[id_1], l[id_2])[0],   mass = softmax(l)[id_1] + softmax(l)[id_2]

In both modes `mass` is recorded (text mode: at the position of the written digit, one more
forward pass). In logprobs mode an answer with mass < min_mass is invalid: the model wanted to
say something other than "1" or "2", and the renormalised p_first would read tokens it would not
write. The default 1/2 is the point where a reply sampled there holds a digit more often than not,
so a logprobs verdict is kept only where the paper's text protocol would more likely than not
have had an answer at all. In text mode the written digit is the answer, whatever the mass.

id_1 and id_2 are taken from the tokenizer, not hard-coded: prefix + "1" and prefix + "2" must
tokenise to the prefix's own tokens plus one token each, else the tokenizer is refused by name.
Requests go in batches (a question's two orders side by side: same length, no padding between
them); rows are left-padded, so every row's last token is at [-1].
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


VERDICT_FROM = ("text", "logprobs")


class LocalJudge:
  """judge.Backend over a loaded users/vlm.ChatVLM (either family)."""

  def __init__(self, vlm: vlm_lib.ChatVLM, *, cot: bool = True,
               decoding: vlm_lib.Decoding = vlm_lib.Decoding(temperature=1.0),
               batch_size: int = 2, verdict_from: str = "text", min_mass: float = 0.5):
    if verdict_from not in VERDICT_FROM:
      raise ValueError(f"--verdict_from={verdict_from!r}: one of {', '.join(VERDICT_FROM)}")
    if not 0 <= min_mass <= 1:
      raise ValueError(f"--min_answer_mass must be in [0, 1], got {min_mass}")
    self.vlm, self.cot, self.decoding, self.batch_size = vlm, cot, decoding, max(1, batch_size)
    self.verdict_from, self.min_mass = verdict_from, min_mass
    self.id_1, self.id_2 = answer_token_ids(vlm.tokenizer)
    self.name = f"local:{vlm.model_id}"

  def describe(self) -> dict:
    generates = self.cot or self.verdict_from == "text"
    return {"backend": "local", **self.vlm.describe(), "cot": self.cot,
            "verdict_from": self.verdict_from, "min_mass": self.min_mass,
            "decoding": self.decoding.as_dict() if generates else None,
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
      if self.verdict_from == "text":
        out += self._from_text(batch, start)
        continue
      reasoning = self._reason(batch, start) if self.cot else [""] * len(batch)
      suffixes = [r + judge_prompt.ANSWER_PREFIX for r in reasoning]
      out += [self._checked(p, m, r) for (p, m), r in zip(self.read(batch, suffixes), reasoning)]
    return out

  def _checked(self, p: float, mass: float, text: str) -> judge_lib.Answer:
    """A logprobs answer, invalid below min_mass (module docstring)."""
    if mass < self.min_mass:
      return judge_lib.Answer(None, text=text, mass=mass,
                              problem=f"probability mass on '1'+'2' is {mass:.3g}, below "
                              f"min_mass {self.min_mass:g}")
    return judge_lib.Answer(p, text=text, mass=mass)

  def _from_text(self, batch, start: int) -> list[judge_lib.Answer]:
    """The paper's verdict: each reply's own written digit; the mass read where it was written."""
    texts = self._generate(batch, start)
    found = [judge_prompt.answer_in(t) for t in texts]
    have = [k for k, m in enumerate(found) if m is not None]
    masses = dict(zip(have, (m for _, m in self.read([batch[k] for k in have],
                                                      [texts[k][:found[k].start(1)]
                                                       for k in have])))) if have else {}
    out = []
    for k, (t, m) in enumerate(zip(texts, found)):
      if m is None:
        out.append(judge_lib.Answer(None, text=t, problem="no 'Prediction of user preference: "
                                    f"1|2' in the reply ({t[-120:]!r})"))
      else:
        out.append(judge_lib.Answer(1.0 if m.group(1) == "1" else 0.0, text=t, mass=masses[k]))
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

  def _generate(self, batch, start: int) -> list[str]:
    """The sampled (or greedy) replies of a batch, seeded by the decoding's seed and the batch."""
    inputs = self.vlm.inputs(batch)
    seqs = self.vlm.generate(inputs, self.decoding, vlm_lib.batch_seed(self.decoding.seed,
                                                                       f"judge:{start}"))
    new = seqs[:, inputs["input_ids"].shape[1]:]
    return [self.vlm.tokenizer.decode(row, skip_special_tokens=True) for row in new]

  def _reason(self, batch, start: int) -> list[str]:
    """The chain of thought, cut before its last answer marker (so the forward pass reads the
    digit itself); a reply without a marker is kept whole and the prefix appended."""
    marker = judge_prompt.ANSWER_PREFIX.rstrip()
    out = []
    for t in self._generate(batch, start):
      head, sep, _ = t.rpartition(marker)
      out.append(head if sep else (t.rstrip() + "\n"))
    return out

"""The local VLM judge on its Qwen2-VL family (users/qwen2_vl.py), on a tiny random Qwen2-VL: the
answer ids taken from the tokenizer and checked, batched left-padded answers equal to unpadded
forward passes built here by hand (Qwen2-VL's own image spelling, the model's own 3-D positions),
the chain of thought, and --judge=local choosing the family by the checkpoint's model_type."""
import json
import re
import types

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_qwen2vl
from tiny_llava import save_tiny_llava
from ppd_jax.evals import judge
from ppd_jax.evals import judge_backends
from ppd_jax.evals import judge_local
from ppd_jax.evals import judge_prompt
from ppd_jax.users import prompts
from ppd_jax.users import qwen2_vl
from ppd_jax.users import vlm as vlm_lib


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny_qwen2vl.save_tiny_qwen2vl(str(tmp_path_factory.mktemp("judge_qwen2vl")))


@pytest.fixture(scope="module")
def qwen(folder):
  return judge_local.load_vlm(folder)


def _questions():
  """Two questions whose prompts differ in length (captions, and image sizes: the new pairs'
  images are resized to different grids, hence different <|image_pad|> counts)."""
  rng = np.random.default_rng(0)
  im = lambda h, w: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
  context = tuple(prompts.Pair(f"pair {k}" + " word" * k, im(24, 32), im(40, 24), 1 + k % 2)
                  for k in range(4))
  return [judge.Question(context, "a short one", im(32, 32), im(20, 36)),
          judge.Question(context, "a much longer caption for the new pair", im(28, 28),
                         im(36, 20))]


def test_answer_ids_come_from_the_tokenizer_and_are_checked(qwen, folder):
  local = judge_local.LocalJudge(qwen)
  tok = qwen.tokenizer
  assert (local.id_1, local.id_2) == (tok.convert_tokens_to_ids("1"),
                                      tok.convert_tokens_to_ids("2"))
  assert tok.decode([local.id_1]) == "1" and tok.decode([local.id_2]) == "2"
  base = tok.encode(judge_prompt.ANSWER_PREFIX, add_special_tokens=False)
  assert tok.encode(judge_prompt.ANSWER_PREFIX + "2", add_special_tokens=False) == base + [
      local.id_2]
  assert local.describe()["answer_ids"] == [local.id_1, local.id_2]
  assert local.describe()["family"] == "qwen2_vl"
  # A tokenizer that spells "preference: 1" as one token cannot be read from one distribution.
  merging = judge_local.load_vlm(folder)
  merging.tokenizer.add_tokens(["preference: 1"])
  with pytest.raises(ValueError, match=re.escape(repr(folder))):
    judge_local.LocalJudge(merging)


def _hand_inputs(tokenizer, image_processor, request, *, cot: bool, suffix: str) -> dict:
  """One unpadded prompt spelt out by hand: ChatML turns, each image as <|vision_start|> +
  t*h*w/4 x <|image_pad|> + <|vision_end|> (merge 2), then `suffix` in the assistant turn."""
  q = request.question
  segments, images = judge_prompt.judge_prompt(q.context, q.caption, request.first,
                                               request.second, cot)
  user, k = "", 0
  for s in segments:
    if s is prompts.IMAGE:
      t, h, w = image_processor([images[k]])["image_grid_thw"][0].tolist()
      user += "<|vision_start|>" + "<|image_pad|>" * (t * h * w // 4) + "<|vision_end|>"
      k += 1
    else:
      user += s
  text = ("<|im_start|>system\n" + prompts.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n"
          + user + "<|im_end|>\n<|im_start|>assistant\n" + suffix)
  ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
  pix = image_processor(images, return_tensors="pt")
  return {"input_ids": ids, "pixel_values": pix["pixel_values"],
          "image_grid_thw": pix["image_grid_thw"],
          "mm_token_type_ids": (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()}


def _reference(model, tokenizer, image_processor, request) -> tuple[float, float]:
  """(p_first, mass) from one unpadded forward pass after the answer prefix."""
  inputs = _hand_inputs(tokenizer, image_processor, request, cot=False,
                        suffix="Prediction of user preference: ")
  with torch.inference_mode():
    logits = model(**inputs).logits[0, -1].double()
  probs = torch.softmax(logits, -1)
  p1, p2 = probs[tokenizer.convert_tokens_to_ids("1")], probs[tokenizer.convert_tokens_to_ids("2")]
  return float(p1 / (p1 + p2)), float(p1 + p2)


def test_batched_left_padded_answers_equal_unpadded_forward_passes(qwen):
  local = judge_local.LocalJudge(qwen, batch_size=4, cot=False, verdict_from="logprobs",
                                 min_mass=0.0)
  questions = _questions()
  reqs = [r for q in questions for r in judge.requests_for(q)]
  # The batch is padded: the two questions' prompts differ in length.
  mask = qwen.inputs(local.prompts_of(reqs))["attention_mask"]
  assert len(set(mask.sum(1).tolist())) == 2 and not bool(mask.all())
  answers = local.answer(reqs)
  for r, a in zip(reqs, answers):
    p_first, mass = _reference(qwen.model, qwen.tokenizer, qwen.image_processor, r)
    assert a.p_first == pytest.approx(p_first, abs=1e-5)
    assert a.mass == pytest.approx(mass, rel=1e-4)
  # The two orders are different prompts: their answers differ.
  assert abs(answers[0].p_first - answers[1].p_first) > 1e-4
  out = judge.judge(local, questions)
  assert all(j.verdict in judge.VERDICTS[:3] for j in out)


def _greedy_by_hand(model, tokenizer, inputs: dict, steps: int) -> str:
  """Greedy decoding by full forward passes (no cache, positions recomputed by the model each
  time), the vision tokens suppressed, stopping at <|im_end|>."""
  banned = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>",
                                            "<|image_pad|>", "<|video_pad|>"])
  eos, ids, new = tokenizer.convert_tokens_to_ids("<|im_end|>"), inputs["input_ids"], []
  for _ in range(steps):
    with torch.no_grad():
      logits = model(**{**inputs, "input_ids": ids,
                        "mm_token_type_ids": torch.nn.functional.pad(
                            inputs["mm_token_type_ids"], (0, len(new)))}).logits[0, -1]
    logits[banned] = -float("inf")
    nxt = int(logits.argmax())
    if nxt == eos:
      break
    new.append(nxt)
    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
  return tokenizer.decode(new, skip_special_tokens=True)


def test_chain_of_thought_then_the_answer(qwen):
  steps = 4
  greedy = vlm_lib.Decoding(mode="greedy", max_new_tokens=steps)
  reqs = [r for q in _questions() for r in judge.requests_for(q)]
  batched = judge_local.LocalJudge(qwen, cot=True, batch_size=4, decoding=greedy,
                                   verdict_from="logprobs", min_mass=0.0).answer(reqs)
  for a in batched:     # an answer, or a problem the judge counts
    assert (0 < a.p_first < 1 and a.text) or (a.p_first is None and a.problem)
    assert judge_prompt.ANSWER_PREFIX.strip() not in a.text
  # Left-padded, cached generation continues each prompt as greedy decoding of it alone would
  # (the model's 3-D positions carried through the generated tokens): a shorter and a longer row.
  for r, a in zip(reqs[1:3], batched[1:3]):
    inputs = _hand_inputs(qwen.tokenizer, qwen.image_processor, r, cot=True, suffix="")
    assert a.text == _greedy_by_hand(qwen.model, qwen.tokenizer, inputs, steps).rstrip() + "\n"


def _flags(model):
  return types.SimpleNamespace(judge="local", judge_model=model, cot=False,
                               judge_temperature=1.0, judge_batch=2, verdict_from="logprobs",
                               min_answer_mass=0.5)


def test_judge_flags_choose_the_family_by_model_type(folder, tmp_path):
  backend = judge_backends.from_flags(_flags(folder), str(tmp_path))
  assert isinstance(backend, judge_local.LocalJudge)
  assert type(backend.vlm) is qwen2_vl.Qwen2VL and backend.name == f"local:{folder}"
  llava = save_tiny_llava(str(tmp_path / "llava"))
  assert type(judge_backends.from_flags(_flags(llava), str(tmp_path)).vlm) is vlm_lib.VLM
  other = tmp_path / "qwen25"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
  with pytest.raises(ValueError, match=r"model_type 'qwen2_5_vl' is not a local judge family "
                                       r"\(supported: llava_onevision, qwen2_vl\)"):
    judge_backends.from_flags(_flags(str(other)), str(tmp_path))
  with pytest.raises(ValueError, match="no readable config.json"):
    judge_backends.from_flags(_flags(str(tmp_path / "missing")), str(tmp_path))

"""The local VLM judge (evals/judge_local.py) on the tiny random LLaVA-OneVision: the answer ids
taken from the tokenizer, batched and left-padded answers equal to one unpadded forward pass per
prompt, both orders, and the chain-of-thought path."""
import numpy as np
import pytest
import torch
from PIL import Image

from tiny_llava import save_tiny_llava
from ppd_jax.evals import judge
from ppd_jax.evals import judge_local
from ppd_jax.evals import judge_prompt
from ppd_jax.users import prompts
from ppd_jax.users import vlm as vlm_lib


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
  return vlm_lib.VLM.load(save_tiny_llava(str(tmp_path_factory.mktemp("judge_llava"))))


def _questions():
  rng = np.random.default_rng(0)
  im = lambda h, w: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
  context = tuple(prompts.Pair(f"pair {k}" + " word" * k, im(24, 32), im(40, 24), 1 + k % 2)
                  for k in range(4))
  return [judge.Question(context, "a short one", im(32, 32), im(20, 36)),
          judge.Question(context, "a much longer caption for the new pair", im(28, 28),
                         im(36, 20))]


def test_answer_ids_come_from_the_tokenizer(vlm):
  id_1, id_2 = judge_local.answer_token_ids(vlm.tokenizer)
  assert vlm.tokenizer.decode([id_1]) == "1" and vlm.tokenizer.decode([id_2]) == "2"

  class Merging:        # a tokenizer that spells ": 1" as one token after the prefix's others
    name_or_path = "merging"

    def encode(self, text, add_special_tokens=False):
      return [5, 6] if text.endswith(": ") else [5, 7 + int(text[-1])]
  with pytest.raises(ValueError, match="'merging'"):
    judge_local.answer_token_ids(Merging())


def test_batched_answers_equal_unpadded_forward_passes(vlm):
  local = judge_local.LocalJudge(vlm, batch_size=4)
  questions = _questions()
  reqs = [r for q in questions for r in judge.requests_for(q)]
  answers = local.answer(reqs)
  id_1, id_2 = judge_local.answer_token_ids(vlm.tokenizer)
  for r, a in zip(reqs, answers):
    [prompt] = local.prompts_of([r])
    text = vlm_lib.chat_text(prompt[0], vlm.image_token * vlm.tokens_per_image)
    ids = vlm.tokenizer(text + "Prediction of user preference: ", return_tensors="pt",
                        add_special_tokens=False)["input_ids"]
    pix = vlm.image_processor([prompt[1]], return_tensors="pt")
    with torch.inference_mode():
      logits = vlm.model(input_ids=ids, pixel_values=pix["pixel_values"],
                         image_sizes=pix["image_sizes"],
                         batch_num_images=pix["batch_num_images"]).logits[0, -1].double()
    probs = torch.softmax(logits, -1)
    expected = probs[id_1] / (probs[id_1] + probs[id_2])
    assert a.p_first == pytest.approx(float(expected), abs=1e-4)
    assert a.mass == pytest.approx(float(probs[id_1] + probs[id_2]), rel=1e-3)
  # The two orders are different prompts: their answers differ.
  assert answers[0].p_first != answers[1].p_first
  out = judge.judge(local, questions)
  assert all(j.verdict in judge.VERDICTS[:3] for j in out)


def test_chain_of_thought_then_the_answer(vlm):
  local = judge_local.LocalJudge(vlm, cot=True, batch_size=2,
                                 decoding=vlm_lib.Decoding(mode="greedy", max_new_tokens=4))
  [a, b] = local.answer(judge.requests_for(_questions()[0]))
  assert 0 < a.p_first < 1 and 0 < b.p_first < 1 and a.text and b.text
  assert "User Profile" in prompts.render(local.prompts_of(
      judge.requests_for(_questions()[0])[:1])[0][0], "")
  assert judge_prompt.ANSWER_PREFIX.strip() not in a.text

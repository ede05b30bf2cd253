"""The local VLM judge (evals/judge_local.py) on the tiny random LLaVA-OneVision: the answer ids
taken from the tokenizer, batched and left-padded answers equal to one unpadded forward pass per
prompt, both orders, the chain-of-thought path, answers with too little mass on "1"/"2" marked
invalid, and the verdict read from the written reply (the paper's)."""
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
  local = judge_local.LocalJudge(vlm, batch_size=4, cot=False, verdict_from="logprobs",
                                 min_mass=0.0)
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
  local = judge_local.LocalJudge(vlm, cot=True, batch_size=2, verdict_from="logprobs",
                                 min_mass=0.0,
                                 decoding=vlm_lib.Decoding(mode="greedy", max_new_tokens=4))
  [a, b] = local.answer(judge.requests_for(_questions()[0]))
  assert 0 < a.p_first < 1 and 0 < b.p_first < 1 and a.text and b.text
  assert "User Profile" in prompts.render(local.prompts_of(
      judge.requests_for(_questions()[0])[:1])[0][0], "")
  assert judge_prompt.ANSWER_PREFIX.strip() not in a.text


def _by_hand(vlm, request, local, suffix: str):
  """(p("1") / (p("1") + p("2")), p("1") + p("2")) after prompt + suffix, one unpadded pass."""
  [prompt] = local.prompts_of([request])
  text = vlm_lib.chat_text(prompt[0], vlm.image_token * vlm.tokens_per_image)
  ids = vlm.tokenizer(text + suffix, return_tensors="pt", add_special_tokens=False)["input_ids"]
  pix = vlm.image_processor([prompt[1]], return_tensors="pt")
  with torch.inference_mode():
    logits = vlm.model(input_ids=ids, pixel_values=pix["pixel_values"],
                       image_sizes=pix["image_sizes"],
                       batch_num_images=pix["batch_num_images"]).logits[0, -1].double()
  probs = torch.softmax(logits, -1)
  p1, p2 = (float(probs[vlm.tokenizer.convert_tokens_to_ids(d)]) for d in "12")
  return p1 / (p1 + p2), p1 + p2


def test_answers_with_little_mass_on_the_digits_are_invalid(vlm):
  reqs = judge.requests_for(_questions()[0])
  kept = judge_local.LocalJudge(vlm, cot=False, verdict_from="logprobs", min_mass=0.0)
  strict = judge_local.LocalJudge(vlm, cot=False, verdict_from="logprobs")   # default min_mass
  assert strict.min_mass == 0.5 and strict.describe()["min_mass"] == 0.5
  loose, checked = kept.answer(reqs), strict.answer(reqs)
  for r, a, b in zip(reqs, loose, checked):
    # The random model spreads its mass over its whole vocabulary: far below 1/2.
    p, mass = _by_hand(vlm, r, kept, judge_prompt.ANSWER_PREFIX)
    assert a.mass == pytest.approx(mass, rel=1e-3) and mass < 0.5
    assert a.p_first == pytest.approx(p, abs=1e-4)
    assert b.p_first is None and b.mass == pytest.approx(mass, rel=1e-3)
    assert b.problem == f"probability mass on '1'+'2' is {b.mass:.3g}, below min_mass 0.5"
  # A threshold under the answers' mass keeps them.
  between = judge_local.LocalJudge(vlm, cot=False, verdict_from="logprobs",
                                   min_mass=min(a.mass for a in loose) * 0.99)
  assert [a.p_first for a in between.answer(reqs)] == pytest.approx([a.p_first for a in loose])
  judged = judge.judge(strict, _questions())
  assert [j.verdict for j in judged] == ["invalid"] * 2
  # The judgement keeps both orders' masses (the verdict logs record them).
  assert judged[0].mass == pytest.approx((checked[0].mass, checked[1].mass))


def test_the_verdict_from_the_written_reply(vlm, monkeypatch):
  """The paper's protocol: the sampled reply's last answer digit decides; a reply without one is
  invalid; the mass is read where the digit was written."""
  reqs = judge.requests_for(_questions()[0])
  decoding = vlm_lib.Decoding(mode="sample", temperature=1.0, seed=7, max_new_tokens=6)
  local = judge_local.LocalJudge(vlm, batch_size=2, decoding=decoding)
  assert (local.cot, local.verdict_from) == (True, "text")         # the paper's, by default
  assert local.describe()["decoding"] == decoding.as_dict()
  # The real, seeded sampling path: the random model writes no answer, so both are invalid,
  # and the same seed gives the same replies.
  first, again = local.answer(reqs), local.answer(reqs)
  assert [a.text for a in first] == [a.text for a in again] and all(a.text for a in first)
  assert all(a.p_first is None and "no 'Prediction of user preference" in a.problem
             for a in first)
  # Replies scripted through generate(): the last written digit counts.
  replies = ["Pair 1: ... Prediction of user preference: 1\nso Prediction of user "
             "preference: 2", "I cannot tell."]
  seen = []

  def scripted(inputs, dec, seed):
    seen.append((dec, seed))
    new = [vlm.tokenizer.encode(t, add_special_tokens=False) for t in replies]
    width = max(map(len, new))
    rows = [ids + [vlm.pad_id] * (width - len(ids)) for ids in new]
    return torch.cat([inputs["input_ids"], torch.tensor(rows)], dim=1)
  monkeypatch.setattr(vlm, "generate", scripted)
  a, b = local.answer(reqs)
  assert seen == [(decoding, vlm_lib.batch_seed(7, "judge:0"))]
  assert a.p_first == 0.0 and a.text == replies[0]
  assert a.mass == pytest.approx(_by_hand(vlm, reqs[0], local, replies[0][:-1])[1], rel=1e-3)
  assert b.p_first is None and b.text == replies[1] and "I cannot tell." in b.problem

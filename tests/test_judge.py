"""The judge (evals/judge.py): the verdict rule, the debiased score and the position bias on
hand-made answers; the prompt's layout; the API backend against a stub HTTP server on 127.0.0.1
(both orders, the answer and its logprobs, retries, the cache, errors, and the key never written
or logged); the synthetic judge."""
import http.server
import os
import json
import math
import threading

import numpy as np
import pytest
from PIL import Image

from ppd_jax.evals import judge
from ppd_jax.evals import judge_api
from ppd_jax.evals import judge_prompt
from ppd_jax.evals import judge_synthetic
from ppd_jax.evals import stats
from ppd_jax.users import prompts

SECRET = "sk-test-SECRET-4f9a2c"


def _image(value: int) -> Image.Image:
  return Image.fromarray(np.full((8, 8, 3), value, np.uint8))


CONTEXT = tuple(prompts.Pair(f"caption {k}", _image(10 * k), _image(10 * k + 5), 1 + k % 2)
                for k in range(4))


def question(a=200, b=40, user=None):
  return judge.Question(CONTEXT, "a new caption", _image(a), _image(b), user_id=user)


class Scripted:
  """A backend answering P(first) from a list, in request order."""
  name = "scripted"

  def __init__(self, p):
    self.p = list(p)

  def answer(self, requests):
    return [judge.Answer(self.p.pop(0)) for _ in requests]


def test_verdicts_soft_scores_and_bias_against_direct_arithmetic():
  pairs = [(0.8, 0.3), (0.2, 0.9), (0.9, 0.9), (None, 0.4), (0.6, 0.5)]
  out = judge.judge(Scripted([p for pair in pairs for p in pair]), [question()] * len(pairs))
  assert [j.verdict for j in out] == ["A", "B", "inconsistent", "invalid", "inconsistent"]
  for (pa, pb), j in zip(pairs, out):
    if pa is None:
      assert j.soft is None
      continue
    p_ab, p_ba = pa, 1 - pb                        # both P(A preferred)
    assert j.p_ab == pytest.approx(p_ab) and j.p_ba == pytest.approx(p_ba)
    assert j.soft == pytest.approx((p_ab + p_ba) / 2)
    # bias = mean P(first shown chosen) - 1/2 over the two orders.
    assert j.bias == pytest.approx((pa + pb) / 2 - 0.5)
  s = judge.summarise(out)
  assert s["counts"] == {"A": 1, "B": 1, "inconsistent": 2, "invalid": 1}
  assert s["win_rate_a"] == pytest.approx(1 / 2)
  assert s["consistency"] == pytest.approx(2 / 4)
  assert s["tie_counted"] == pytest.approx((1 + 0.5 * 2) / 4)
  softs = [0.75, 0.15, 0.5, 0.55]
  assert s["soft_mean"] == pytest.approx(np.mean(softs))
  assert s["position_bias"] == pytest.approx(np.mean([0.05, 0.05, 0.4, 0.05]))


def test_the_prompt_swaps_only_the_new_pair():
  a, b = _image(1), _image(2)
  seg_ab, im_ab = judge_prompt.judge_prompt(CONTEXT, "new", a, b)
  seg_ba, im_ba = judge_prompt.judge_prompt(CONTEXT, "new", b, a)
  assert seg_ab == seg_ba and sum(s is prompts.IMAGE for s in seg_ab) == 10
  assert im_ab[:8] == im_ba[:8] == [im for p in CONTEXT for im in (p.image_1, p.image_2)]
  assert im_ab[8:] == [a, b] and im_ba[8:] == [b, a]
  text = prompts.render(seg_ab, "<img>")
  assert prompts.PREDICTION_PROMPT in text and text.rstrip().endswith("Here is Image 2: <img>")
  for k, p in enumerate(CONTEXT, start=1):
    assert f"Here is Pair {k}: Here is the caption: {p.caption}" in text
    assert f"Prediction of user preference: {p.preferred}" in text
  assert "Here is Pair 5: Here is the caption: new" in text
  assert "User Profile" not in text
  assert "User Profile" in prompts.render(judge_prompt.judge_prompt(CONTEXT, "new", a, b, True)[0],
                                          "")


class Stub:
  """An OpenAI-compatible /chat/completions on 127.0.0.1. It prefers image A (whatever its
  position) with probability 0.8, answering with logprobs; scripted failures come first."""

  def __init__(self, image_a_url: str, failures=(), reply=None, logprobs=True):
    self.a_url, self.failures = image_a_url, list(failures)
    self.reply, self.logprobs = reply, logprobs
    self.requests, self.headers = [], []
    stub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        stub.requests.append(body)
        stub.headers.append(dict(self.headers))
        status, payload = stub.respond(body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=self.server.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

  def respond(self, body):
    if self.failures:
      status = self.failures.pop(0)
      return status, {"error": {"message": f"scripted {status}"}}
    images = [c["image_url"]["url"] for c in body["messages"][1]["content"]
              if c["type"] == "image_url"]
    digit = "1" if images[-2] == self.a_url else "2"
    other = "2" if digit == "1" else "1"
    text = self.reply or f"Image 1 looks better.\nPrediction of user preference: {digit}"
    choice = {"message": {"role": "assistant", "content": text}}
    if self.logprobs:
      head = text[:text.rfind(digit)]
      choice["logprobs"] = {"content": [
          {"token": head, "logprob": -0.01, "top_logprobs": []},
          {"token": digit, "logprob": math.log(0.8),
           "top_logprobs": [{"token": digit, "logprob": math.log(0.8)},
                            {"token": other, "logprob": math.log(0.15)}]}]}
    return 200, {"model": body["model"], "choices": [choice]}

  def close(self):
    self.server.shutdown()


def test_api_judge_against_a_stub_server(tmp_path, monkeypatch):
  monkeypatch.setenv("PPD_TEST_JUDGE_KEY", SECRET)
  q = question()
  a_url, _ = judge_api.png_data_url(q.image_a)
  stub = Stub(a_url, failures=[429, 503])
  logs = []
  cache = str(tmp_path / "cache.jsonl")
  try:
    api = judge_api.ApiJudge("gpt-4o-mini-2024-07-18", cache, base_url=stub.url,
                             key_env="PPD_TEST_JUDGE_KEY", backoff=0.01, workers=1,
                             log=logs.append)
    [j] = judge.judge(api, [q])
    # Two scripted failures retried, then both orders answered: A preferred in each.
    assert api.calls == 4 and len(stub.requests) == 4 and len(logs) == 2
    assert j.verdict == "A"
    assert j.p_ab == pytest.approx(0.8 / 0.95) and j.p_ba == pytest.approx(0.8 / 0.95)
    assert j.bias == pytest.approx(0.0)
    first, second = stub.requests[-2:]
    assert first["messages"][0] == {"role": "system", "content": prompts.SYSTEM_PROMPT}
    urls = [[c["image_url"]["url"] for c in r["messages"][1]["content"]
             if c["type"] == "image_url"] for r in (first, second)]
    assert urls[0][:8] == urls[1][:8] and urls[0][8:] == urls[1][8:][::-1]
    assert first["logprobs"] is True and first["model"] == "gpt-4o-mini-2024-07-18"
    assert all(h.get("Authorization") == f"Bearer {SECRET}" for h in stub.headers)
    # A rerun is answered from the cache: nothing sent.
    again = judge_api.ApiJudge("gpt-4o-mini-2024-07-18", cache, base_url=stub.url,
                               key_env="PPD_TEST_JUDGE_KEY", log=logs.append)
    assert judge.judge(again, [q]) == [j] and len(stub.requests) == 4 and again.calls == 0
    # Another question (other images) is asked.
    judge.judge(again, [question(a=90, b=250)])
    assert len(stub.requests) == 6
  finally:
    stub.close()
  written = open(cache).read()
  assert SECRET not in written and all(SECRET not in line for line in logs)


def test_api_judge_failures_are_counted_not_guessed(tmp_path, monkeypatch):
  monkeypatch.setenv("PPD_TEST_JUDGE_KEY", SECRET)
  q = question()
  a_url, _ = judge_api.png_data_url(q.image_a)
  logs = []
  # A reply without the answer: invalid, and the reply is kept for reading.
  stub = Stub(a_url, reply="Both images are lovely.", logprobs=False)
  try:
    api = judge_api.ApiJudge("m", str(tmp_path / "c1.jsonl"), base_url=stub.url,
                             key_env="PPD_TEST_JUDGE_KEY", log=logs.append)
    [j] = judge.judge(api, [q])
    assert j.verdict == "invalid" and "no 'Prediction of user preference" in j.problems[0]
    # Without logprobs the answer is hard: p in {0, 1}.
    stub.reply = "**Prediction of user preference:** 2 ... Prediction of user preference: 1"
    [j] = judge.judge(judge_api.ApiJudge("m", str(tmp_path / "c2.jsonl"), base_url=stub.url,
                                         key_env="PPD_TEST_JUDGE_KEY"), [q])
    assert (j.p_ab, j.p_ba) == (1.0, 0.0) and j.verdict == "inconsistent"   # the last answer
    # A status retrying cannot fix: not retried, named.
    stub.failures = [400, 400]
    bad = judge_api.ApiJudge("m", str(tmp_path / "c3.jsonl"), base_url=stub.url,
                             key_env="PPD_TEST_JUDGE_KEY", backoff=0.01, workers=1)
    [j] = judge.judge(bad, [q])
    assert j.verdict == "invalid" and bad.calls == 2 and "HTTP 400" in j.problems[0]
    assert "scripted 400" in j.problems[0]
  finally:
    stub.close()
  # An unreachable server: retried, then invalid with the URL named; nothing cached.
  dead = judge_api.ApiJudge("m", str(tmp_path / "c4.jsonl"), base_url="http://127.0.0.1:9/v1",
                            key_env="PPD_TEST_JUDGE_KEY", retries=2, backoff=0.01,
                            log=logs.append)
  [j] = judge.judge(dead, [q])
  assert j.verdict == "invalid" and "unreachable" in j.problems[0]
  assert "127.0.0.1:9" in j.problems[0] and dead.calls == 6
  assert not (tmp_path / "c4.jsonl").exists()
  assert all(SECRET not in p for p in j.problems) and all(SECRET not in line for line in logs)


def test_a_torn_cache_line_is_skipped_and_not_glued_to_the_next(tmp_path):
  path = str(tmp_path / "cache.jsonl")
  judge_api._append_cache(path, "k1", {"text": "Prediction of user preference: 1"})
  with open(path, "a") as f:
    f.write('{"key": "k2", "reply": {"te')            # killed mid-write
  judge_api._append_cache(path, "k3", {"text": "Prediction of user preference: 2"})
  assert sorted(judge_api._read_cache(path)) == ["k1", "k3"]


class Brightness:
  def score(self, images, prompts):
    return np.asarray(images, np.float32).mean(axis=(1, 2, 3))


class Darkness:
  def score(self, images, prompts):
    return -Brightness().score(images, prompts)


def test_the_synthetic_judge_answers_from_the_hidden_reward():
  arrays = lambda v: np.full((8, 8, 3), v / 127.5 - 1, np.float32)
  q = judge.Question(CONTEXT, "c", arrays(200), arrays(40), user_id=3)
  darker = judge.Question(CONTEXT, "c", arrays(200), arrays(40), user_id=4)
  seen = []
  reward_for = lambda u: seen.append(u) or (Brightness() if u == 3 else Darkness())
  # Two users in one call: each user's requests are scored with that user's reward.
  j, k = judge.judge(judge_synthetic.SyntheticJudge(reward_for), [q, darker])
  assert j.verdict == "A" and k.verdict == "B" and sorted(seen) == [3, 4]
  assert j.bias == pytest.approx(0.0, abs=1e-6)
  assert j.p_ab == pytest.approx(1 / (1 + np.exp(-(160 / 127.5) / 0.1)), rel=1e-6)
  near = judge.Question(CONTEXT, "c", arrays(130), arrays(128), user_id=3)
  biased = judge_synthetic.SyntheticJudge(reward_for, temperature=0.1, position_bias_logit=3.0)
  [j] = judge.judge(biased, [near])
  # Favouring the first-shown image flips the verdict with the order: dropped as inconsistent,
  # while the debiased score still leans to the better image.
  assert j.verdict == "inconsistent" and j.soft > 0.5 and j.bias > 0.3
  [j] = judge.judge(judge_synthetic.SyntheticJudge(reward_for), [question()])
  assert j.verdict == "invalid" and "user_id" in j.problems[0]


def test_wilson_interval_against_its_definition():
  """The interval is the set of p0 with |k/n - p0| <= z sqrt(p0 (1 - p0) / n): found here by a
  fine grid, independently of the closed form."""
  grid = np.linspace(0, 1, 200001)
  for k, n in ((8, 10), (76, 100), (0, 10), (10, 10), (1224, 1632)):
    inside = grid[np.abs(k / n - grid) <= stats.Z95 * np.sqrt(grid * (1 - grid) / n)]
    lo, hi = stats.wilson(k, n)
    assert lo == pytest.approx(inside.min(), abs=2e-5) and hi == pytest.approx(inside.max(),
                                                                               abs=2e-5)
  assert stats.wilson(0, 0) == (None, None)


class ByBrightness:
  """A judge that prefers the brighter image, except on captions with 'coin' where it always
  says the first shown (so those come out inconsistent); counts what it was asked."""
  name = "brightness"

  def __init__(self):
    self.asked = 0

  def answer(self, requests):
    self.asked += len(requests)
    out = []
    for r in requests:
      if "coin" in r.question.caption:
        out.append(judge.Answer(0.9))
        continue
      first, second = (np.asarray(x, np.float32).mean() for x in (r.first, r.second))
      out.append(judge.Answer(0.9 if first > second else 0.1))
    return out


def _pairs_file(tmp_path):
  """3 users of 7 pairs: user 1 always prefers the brighter image, user 2 the darker, user 3
  the brighter but with 'coin' captions on two of its later pairs."""
  rows = []
  for u in (1, 2, 3):
    for k in range(7):
      bright, dark = 150 + 10 * k, 40 + 5 * k
      first_bright = (k + u) % 2 == 0
      names = []
      for side, v in (("a", bright if first_bright else dark),
                      ("b", dark if first_bright else bright)):
        name = f"u{u}_{k}_{side}.png"
        _image(v).save(tmp_path / name)
        names.append(name)
      likes_bright = u != 2
      preferred = 1 if first_bright == likes_bright else 2
      caption = "a coin" if (u == 3 and k in (5, 6)) else f"caption {k}"
      rows.append({"user_id": u, "caption": caption, "image_1": names[0], "image_2": names[1],
                   "preferred": preferred})
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


def test_judge_agreement_counts_resumes_and_summarises(tmp_path):
  from ppd_jax.evals import judge_agreement
  from ppd_jax.users import shots
  pairs = shots.open_pairs(_pairs_file(tmp_path), 4, split_params={}, log=lambda m: None)
  out = str(tmp_path / "agree")

  class Stop(Exception):
    pass

  def stop_after_first(u):
    raise Stop(u)
  backend = ByBrightness()
  with pytest.raises(Stop):
    judge_agreement.run(pairs, backend, out, split="all", questions=3, log=lambda m: None,
                        after_user=stop_after_first)
  assert backend.asked == 3 * 2
  with open(os.path.join(out, "judgements.jsonl"), "a") as f:    # user 2 cut off mid-write
    f.write(json.dumps({"user_id": 2, "pair_id": 99, "truth": "A", "verdict": "A", "soft": 1.0,
                        "bias": 0.0, "problems": []}) + "\n{\"us")
  summary = judge_agreement.run(pairs, backend, out, split="all", questions=3,
                                log=lambda m: None)
  assert backend.asked == 9 * 2                  # the first user was not asked again
  # Independently: the questions are pairs 4, 5, 6 of each user; image 1 is the brighter one
  # when (k + u) is even. Users 1 and 3 agree on every decided question, user 2 on none; user 3's
  # two 'coin' questions are inconsistent.
  verdicts = {u: ["A" if (k + u) % 2 == 0 else "B" for k in (4, 5, 6)] for u in (1, 2, 3)}
  decided = verdicts[1] + verdicts[2] + verdicts[3][:1]
  assert summary["counts"] == {"A": decided.count("A"), "B": decided.count("B"),
                               "inconsistent": 2, "invalid": 0}
  assert summary["right"] == 3 + 1 and summary["accuracy"] == pytest.approx(4 / 7)
  assert summary["wilson95"] == [pytest.approx(x) for x in stats.wilson(4, 7)]
  assert summary["consistency"] == pytest.approx(7 / 9)
  assert summary["dropped_inconsistent"] == pytest.approx(2 / 9)
  with open(os.path.join(out, "agreement.json")) as f:
    assert json.load(f)["accuracy"] == summary["accuracy"]
  # A rerun asks nothing and reads back the same summary (what the cut-off user left ignored).
  assert judge_agreement.run(pairs, backend, out, split="all", questions=3,
                             log=lambda m: None) == summary
  assert backend.asked == 18
  with pytest.raises(ValueError, match="more than 7 pairs"):
    judge_agreement.run(pairs, backend, out, split="all", questions=3, shots=7,
                        log=lambda m: None)

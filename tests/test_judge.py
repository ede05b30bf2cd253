"""The judge (evals/judge.py): the verdict rule, the debiased score and the position bias on
hand-made answers; the prompt's layout; the API backend against a stub HTTP server on 127.0.0.1
(both orders, the answer and its logprobs, retries, the cache, errors, and the key never written
or logged; invalid replies never cached; a refused key stopping the run with one line; the verdict
from the text or the logprobs); the judge flags' defaults; judge agreement re-asking invalid
answers, through run() and through its CLI; the synthetic judge."""
import base64
import http.server
import io
import os
import json
import math
import subprocess
import sys
import threading
import types

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
  position) with probability 0.8, answering with logprobs when asked for them; scripted failures
  come first. refuse: a status (401/403) answered to every request after the first
  `refuse_after`; finish_reason: what each reply says (None: the field left out)."""

  def __init__(self, image_a_url: str, failures=(), reply=None, logprobs=True, refuse=None,
               refuse_after=0, finish_reason="stop"):
    self.a_url, self.failures = image_a_url, list(failures)
    self.reply, self.logprobs = reply, logprobs
    self.refuse, self.refuse_after, self.finish_reason = refuse, refuse_after, finish_reason
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
    if self.refuse and len(self.requests) > self.refuse_after:
      return self.refuse, {"error": {"message": f"Incorrect API key provided: {SECRET[:6]}..."}}
    if self.failures:
      status = self.failures.pop(0)
      return status, {"error": {"message": f"scripted {status}"}}
    images = [c["image_url"]["url"] for c in body["messages"][1]["content"]
              if c["type"] == "image_url"]
    if self.a_url is None:             # no image A given: the brighter new image is preferred
      first, second = (np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))),
                                  np.float32).mean() for u in images[-2:])
      digit = "1" if first > second else "2"
    else:
      digit = "1" if images[-2] == self.a_url else "2"
    other = "2" if digit == "1" else "1"
    text = self.reply or f"Image 1 looks better.\nPrediction of user preference: {digit}"
    choice = {"message": {"role": "assistant", "content": text}}
    if self.finish_reason is not None:
      choice["finish_reason"] = self.finish_reason
    if self.logprobs and body.get("logprobs"):
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
                             verdict_from="logprobs", log=logs.append)
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
                               key_env="PPD_TEST_JUDGE_KEY", verdict_from="logprobs",
                               log=logs.append)
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
  j, k = judge.judge(judge_synthetic.SyntheticJudge(reward_for, sample=False), [q, darker])
  assert j.verdict == "A" and k.verdict == "B" and sorted(seen) == [3, 4]
  assert j.bias == pytest.approx(0.0, abs=1e-6)
  assert j.p_ab == pytest.approx(1 / (1 + np.exp(-(160 / 127.5) / 0.1)), rel=1e-6)
  near = judge.Question(CONTEXT, "c", arrays(130), arrays(128), user_id=3)
  biased = judge_synthetic.SyntheticJudge(reward_for, temperature=0.1, position_bias_logit=3.0,
                                          sample=False)
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
  # Users 1 and 3 are always right, user 2 never: the questions of a user are not independent,
  # and the interval over users is much wider than Wilson's over questions.
  lo, hi = summary["ci95_users"]
  assert lo <= summary["accuracy"] <= hi and hi - lo > 1.5 * (summary["wilson95"][1]
                                                                - summary["wilson95"][0])
  # Another judge, or other questions, into the same folder: refused, naming the field.
  other = ByBrightness()
  other.name = "darkness"
  with pytest.raises(ValueError, match="judge.backend"):
    judge_agreement.run(pairs, other, out, split="all", questions=3, log=lambda m: None)
  with pytest.raises(ValueError, match="questions_per_user: 3 -> 2"):
    judge_agreement.run(pairs, backend, out, split="all", questions=2, log=lambda m: None)
  assert other.asked == 0 and backend.asked == 18


def _api(stub, cache, **kw):
  return judge_api.ApiJudge("m", str(cache), base_url=stub.url, key_env="PPD_TEST_JUDGE_KEY",
                            backoff=0.01, workers=1, **kw)


def test_invalid_replies_are_never_cached_and_a_rerun_asks_again(tmp_path, monkeypatch):
  monkeypatch.setenv("PPD_TEST_JUDGE_KEY", SECRET)
  q = question()
  a_url, _ = judge_api.png_data_url(q.image_a)
  cache = tmp_path / "cache.jsonl"
  stub = Stub(a_url, finish_reason="length")
  try:
    # A reply cut short, even one holding an answer, is invalid and not kept.
    [j] = judge.judge(_api(stub, cache), [q])
    assert j.verdict == "invalid" and len(stub.requests) == 2
    assert j.problems == ("reply cut short (finish_reason=length)",) * 2
    assert not cache.exists() or judge_api._read_cache(str(cache)) == {}
    # An unreadable reply: the same.
    stub.finish_reason, stub.reply = "stop", "Both images are lovely."
    [j] = judge.judge(_api(stub, cache), [q])
    assert j.verdict == "invalid" and len(stub.requests) == 4
    assert not cache.exists() or judge_api._read_cache(str(cache)) == {}
    # The rerun asks again and gets the answers, now cached: a third run sends nothing.
    stub.reply = None
    [j] = judge.judge(_api(stub, cache), [q])
    assert j.verdict == "A" and len(stub.requests) == 6
    assert len(judge_api._read_cache(str(cache))) == 2
    assert judge.judge(_api(stub, cache), [q]) == [j] and len(stub.requests) == 6
    # A server that leaves finish_reason out is taken at its word.
    stub.finish_reason = None
    [j] = judge.judge(_api(stub, tmp_path / "other.jsonl"), [q])
    assert j.verdict == "A"
    # An older cache holding an invalid reply under the request's key: asked again.
    old = tmp_path / "old.jsonl"
    api = _api(stub, old)
    for r in judge.requests_for(q):
      judge_api._append_cache(str(old), api.body(r)[1], {"text": "no answer here"})
    before = len(stub.requests)
    [j] = judge.judge(_api(stub, old), [q])
    assert j.verdict == "A" and len(stub.requests) == before + 2
  finally:
    stub.close()


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_stops_the_run_with_one_line(tmp_path, monkeypatch, status):
  monkeypatch.setenv("PPD_TEST_JUDGE_KEY", SECRET)
  qs = [question(a=200 - 10 * k, b=40 + k) for k in range(6)]
  a_url, _ = judge_api.png_data_url(qs[0].image_a)
  stub = Stub(a_url, refuse=status)
  logs = []
  try:
    api = judge_api.ApiJudge("m", str(tmp_path / "c.jsonl"), base_url=stub.url,
                             key_env="PPD_TEST_JUDGE_KEY", backoff=0.01, workers=3,
                             log=logs.append)
    with pytest.raises(judge.JudgeAuthError) as e:
      judge.judge(api, qs)
    msg = str(e.value)
    assert msg == (f"HTTP {status} from {stub.url}/chat/completions: the server refused the API "
                   "key; check the environment variable PPD_TEST_JUDGE_KEY (set)")
    # Not one request per question: at most one per worker was in flight when the first failed.
    assert len(stub.requests) <= 3 and api.calls <= 3
    assert SECRET[:6] not in msg and not logs
    # After a success, a refusal is one invalid answer: the run goes on.
    stub.requests.clear()
    stub.refuse_after = 1
    later = _api(stub, tmp_path / "c2.jsonl")
    j, k = judge.judge(later, qs[:2])
    assert len(stub.requests) == 4 and j.verdict == k.verdict == "invalid"
    assert j.problems == (f"HTTP {status} from {stub.url}/chat/completions (the key was accepted "
                          "before: this request only)",)     # only its B-first order failed
    assert len(k.problems) == 2
  finally:
    stub.close()
  monkeypatch.delenv("PPD_TEST_JUDGE_KEY")
  stub = Stub(a_url, refuse=401)
  try:
    with pytest.raises(judge.JudgeAuthError, match=r"PPD_TEST_JUDGE_KEY \(not set\)"):
      judge.judge(_api(stub, tmp_path / "c3.jsonl"), qs[:1])
  finally:
    stub.close()


def test_verdict_from_the_text_or_from_the_logprobs(tmp_path, monkeypatch):
  monkeypatch.setenv("PPD_TEST_JUDGE_KEY", SECRET)
  q = question()
  a_url, _ = judge_api.png_data_url(q.image_a)
  stub = Stub(a_url)
  cache = tmp_path / "cache.jsonl"
  try:
    text = _api(stub, cache)
    [j] = judge.judge(text, [q])
    # The paper: the sampled digit decides (the stub names A in both orders).
    assert (j.p_ab, j.p_ba, j.verdict) == (1.0, 1.0, "A")
    assert "logprobs" not in stub.requests[-1] and text.describe()["verdict_from"] == "text"
    assert text.describe()["cot"] is True
    soft = _api(stub, cache, verdict_from="logprobs")
    [k] = judge.judge(soft, [q])
    # Asked again (the mode is in the cache key), the digit's alternatives give a soft p.
    assert len(stub.requests) == 4 and stub.requests[-1]["logprobs"] is True
    assert k.p_ab == pytest.approx(0.8 / 0.95) and k.verdict == "A"
    assert soft.describe()["verdict_from"] == "logprobs"
    # A reply without logprobs cannot give a soft verdict: invalid, named.
    stub.logprobs = False
    [k] = judge.judge(_api(stub, tmp_path / "c2.jsonl", verdict_from="logprobs"), [q])
    assert k.verdict == "invalid" and "no logprobs" in k.problems[0]
  finally:
    stub.close()
  with pytest.raises(ValueError, match="verdict_from='soft'"):
    _api(stub, cache, verdict_from="soft")


@pytest.mark.parametrize("command", ["winrate", "judge_agreement"])
def test_the_judge_flags_are_in_help(command):
  """--help lists the judge's flags (defined in judge_backends.py, adopted by the command)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-m", f"ppd_jax.evals.{command}", "--help"], cwd=root,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert "flags:" in done.stdout, done.stderr[-2000:]     # (absl's --help exits 1)
  for flag in ("--judge:", "--judge_model:", "--base_url:", "--key_env:", "--[no]cot:",
               "--verdict_from:", "--judge_temperature:", "--judge_batch:"):
    assert flag in done.stdout, (flag, done.stdout[-2000:])


def test_judge_flags_default_to_the_papers_protocol(tmp_path):
  from absl import flags
  from ppd_jax.evals import judge_backends
  fv = flags.FlagValues()
  judge_backends.define_flags(synthetic=True, flag_values=fv)
  fv(["prog"])
  assert fv.cot is True and fv.verdict_from == "text" and fv.judge_temperature is None
  api = judge_backends.from_flags(fv, str(tmp_path))
  assert isinstance(api, judge_api.ApiJudge)
  assert {k: api.describe()[k] for k in ("cot", "verdict_from", "temperature")} == {
      "cot": True, "verdict_from": "text", "temperature": 1.0}
  fv.unparse_flags()
  fv(["prog", "--nocot", "--verdict_from=logprobs", "--judge_temperature=0.5"])
  api = judge_backends.from_flags(fv, str(tmp_path))
  assert (api.cot, api.verdict_from, api.temperature) == (False, "logprobs", 0.5)
  # --judge=synthetic: the run's users' judge, at --judge_temperature or the judge's own rule.
  import ml_collections
  run = types.SimpleNamespace(source=types.SimpleNamespace(user_reward=None),
                              config=ml_collections.ConfigDict(
                                  {"data": {"source": "synthetic", "min_reward_gap": 0.2}}))
  fv.unparse_flags()
  fv(["prog", "--judge=synthetic"])
  own = judge_backends.from_flags(fv, str(tmp_path), run=run)
  assert own.temperature == judge_synthetic.default_temperature(0.2) and own.seed == 0
  flags.DEFINE_integer("seed", 0, "the command's seed (winrate defines one)", flag_values=fv)
  fv.unparse_flags()
  fv(["prog", "--judge=synthetic", "--judge_temperature=0.3", "--seed=5"])
  given = judge_backends.from_flags(fv, str(tmp_path), run=run)
  assert (given.temperature, given.seed) == (0.3, 5)
  with pytest.raises(ValueError, match="synthetic users"):
    judge_backends.from_flags(fv, str(tmp_path), run=None)


def test_agreement_reasks_only_the_invalid_rows_of_judged_users(tmp_path):
  from ppd_jax.evals import judge_agreement
  from ppd_jax.evals import judge_log
  from ppd_jax.users import shots
  pairs = shots.open_pairs(_pairs_file(tmp_path), 4, split_params={}, log=lambda m: None)
  out = tmp_path / "agree"

  class Flaky(ByBrightness):
    """ByBrightness, but with no answer for "caption 5" while `down`."""
    down = True

    def answer(self, requests):
      good = super().answer(requests)
      return [judge.Answer(None, problem="server down") if self.down and
              r.question.caption == "caption 5" else a for r, a in zip(requests, good)]
  backend, logs = Flaky(), []
  first = judge_agreement.run(pairs, backend, str(out), split="all", questions=3, log=logs.append)
  # Users 1 and 2 ask "caption 5" (pair 5); user 3's pair 5 is "a coin".
  assert first["invalid"] == 2 and first["counts"]["invalid"] == 2 and backend.asked == 18
  log_path = str(out / "judgements.jsonl")
  before = judge_log.read(log_path)
  middle = {u: list(before[u])[1] for u in before}   # each user's 2nd question: its pair 5
  assert judge_log.invalid(before) == {1: [middle[1]], 2: [middle[2]]}
  assert "| invalid |" in (out / "agreement.md").read_text()
  head, _, cells = (out / "agreement.md").read_text().splitlines()[:3]
  column = [c.strip() for c in head.split("|")].index("invalid")
  assert cells.split("|")[column].strip() == "2"
  backend.down = False
  logs.clear()
  second = judge_agreement.run(pairs, backend, str(out), split="all", questions=3,
                               log=logs.append)
  assert backend.asked == 18 + 2 * 2                  # the two invalid questions, both orders
  assert "2 invalid answers of 2 users asked again" in logs[0]
  after = judge_log.read(log_path)
  assert judge_log.invalid(after) == {}
  for u in (1, 2):                                    # a new block: all rows, the valid kept
    assert sorted(after[u]) == sorted(before[u])
    assert all(after[u][k] == before[u][k] for k in before[u] if k != middle[u])
    assert after[u][middle[u]]["verdict"] != "invalid"
  assert after[3] == before[3]
  assert second["invalid"] == 0 and second["questions"] == 9
  # Independently (see the test above): 7 decided, 4 right, once "caption 5" is answered too.
  assert second["right"] == 4 and second["accuracy"] == pytest.approx(4 / 7)
  # A third run asks nothing.
  judge_agreement.run(pairs, backend, str(out), split="all", questions=3, log=logs.append)
  assert backend.asked == 22


def _agreement_cli(pairs, out, url, env):
  return subprocess.run(
      [sys.executable, "-m", "ppd_jax.evals.judge_agreement", f"--pairs={pairs}",
       f"--out={out}", "--split=all", "--questions=3", "--judge=api", f"--base_url={url}",
       "--key_env=PPD_TEST_JUDGE_KEY", "--judge_workers=1"],
      env=env, capture_output=True, text=True, timeout=300)


def test_agreement_cli_refused_key_then_all_invalid_then_asked_again(tmp_path):
  """A 401 stops the CLI with one line about the key; replies without an answer end it non-zero;
  the rerun into the same --out asks those questions again and gets verdicts."""
  pairs = _pairs_file(tmp_path)
  out = tmp_path / "agree"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root, "PPD_TEST_JUDGE_KEY": SECRET, "JAX_PLATFORMS": "cpu",
         "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
  stub = Stub(None, refuse=401)
  outputs = []
  try:
    refused = _agreement_cli(pairs, out, stub.url, env)
    outputs.append(refused.stdout + refused.stderr)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"ppd_jax.evals.judge_agreement: HTTP 401 from {stub.url}/chat/completions: the server "
        "refused the API key; check the environment variable PPD_TEST_JUDGE_KEY (set)")
    assert len(stub.requests) == 1                  # stopped at the first refusal
    # A working key, but replies without an answer: all invalid, the run fails.
    stub.refuse, stub.reply = None, "Both images are lovely."
    blank = _agreement_cli(pairs, out, stub.url, env)
    outputs.append(blank.stdout + blank.stderr)
    assert blank.returncode != 0 and "Traceback" not in blank.stderr, blank.stderr[-2000:]
    assert blank.stderr.strip().splitlines()[-1].startswith(
        "ppd_jax.evals.judge_agreement: no valid verdict: 9 of 9 answers invalid")
    assert json.loads(blank.stdout.strip().splitlines()[-1])["invalid"] == 9
    assert len(stub.requests) == 1 + 9 * 2
    # The server answers: the rerun asks every invalid question again.
    stub.reply = None
    good = _agreement_cli(pairs, out, stub.url, env)
    outputs.append(good.stdout + good.stderr)
    assert good.returncode == 0, good.stderr[-2000:]
    # Users 1 and 3 see the same context and the same "caption 4" pair: asked once, cached.
    assert len(stub.requests) == 1 + 9 * 2 + 8 * 2
    printed = json.loads(good.stdout.strip().splitlines()[-1])
    # The stub prefers the brighter image: users 1 and 3 agree with it, user 2 never.
    assert printed["invalid"] == 0 and printed["accuracy"] == pytest.approx(6 / 9)
    assert "| 0.667 |" in good.stdout
  finally:
    stub.close()
  assert all(SECRET[:6] not in o for o in outputs)
  for name in os.listdir(out):
    assert SECRET[:6] not in (out / name).read_text(), name

"""evals/winrate.py on the tiny trained run with the synthetic judge: per-user win rates against a
direct comparison of the hidden rewards of the saved images, the mean over users and its
bootstrap interval, shared seeds, resuming, and bad flags."""
import json
import os

import numpy as np
import pytest

from ppd_jax import images as image_io
from ppd_jax import inference
from ppd_jax.evals import judge_synthetic
from ppd_jax.evals import stats
from ppd_jax.evals import win_rates
from ppd_jax.evals import winrate
from ppd_jax.rewards import hidden


@pytest.fixture(scope="module")
def ppd(tiny_trained_run):
  return inference.load_trained(tiny_trained_run)


class Counting(judge_synthetic.SyntheticJudge):
  def __init__(self, source):
    super().__init__(lambda u: hidden.HiddenPropertyReward(source, u), sample=False)
    self.asked = 0

  def answer(self, requests):
    self.asked += len(requests)
    return super().answer(requests)


@pytest.mark.parametrize("against", ["base", "control"])
def test_win_rates_against_the_hidden_rewards(ppd, tmp_path, against):
  cases = winrate.user_cases(ppd, "unseen", 3, 2)
  assert len(cases) == 3 and all(len(c.prompts) == 2 and len(c.context) == 4 for c in cases)
  opponent = winrate.Opponent(against, ppd, cases)
  judge = Counting(ppd.source)
  out = str(tmp_path / against)

  class Stop(Exception):
    pass

  def stop(u):
    raise Stop(u)
  with pytest.raises(Stop):
    winrate.run(ppd, opponent, cases, judge, out, seed=4, log=lambda m: None, after_user=stop)
  result = winrate.run(ppd, opponent, cases, judge, out, seed=4, log=lambda m: None)
  assert judge.asked == 3 * 2 * 2                  # the first user was not judged again
  rows = [json.loads(line) for line in open(os.path.join(out, "verdicts.jsonl"))]
  rates = []
  for c in cases:
    mine = [r for r in rows if r.get("user_id") == c.user_id and "item" in r][-2:]
    reward = hidden.HiddenPropertyReward(ppd.source, c.user_id)
    wins = [float(reward.score([r["ppd"]])[0] > reward.score([r["opponent"]])[0]) for r in mine]
    assert [r["verdict"] for r in mine] == ["A" if w else "B" for w in wins]
    rates.append(np.mean(wins))
    assert result["per_user"][str(c.user_id)]["win_rate"] == pytest.approx(np.mean(wins))
  assert result["win_rate"] == pytest.approx(np.mean(rates))
  lo, hi = result["ci95"]
  assert lo <= result["win_rate"] <= hi
  # PPD's images and the opponent's share x_T: the base's first image is what the sampler makes
  # from user 0's seed with the branch off.
  if against == "base":
    first = rows[1] if "item" in rows[1] else rows[2]
    expected = inference.generate(ppd, [cases[0].prompts[0]],
                                  np.zeros((ppd.config.model.user_tokens,
                                            ppd.config.model.user_embed_dim), np.float32),
                                  user_scale=0.0, seed=4)[0]
    got = image_io.load_png(first["opponent"])
    # Equal up to one 8-bit step where a value sits on a rounding boundary (a batch of images and
    # one image take different float paths); another x_T would differ everywhere.
    diff = np.abs(got - (image_io.to_uint8(expected) / 127.5 - 1))
    assert diff.max() <= 1 / 127.5 + 1e-6 and diff.mean() < 1e-3
  for f in ("winrate.json", "winrate.md", "examples.png"):
    assert os.path.getsize(os.path.join(out, f)) > 0
  # Rerun: nothing generated or judged.
  again = winrate.run(ppd, opponent, cases, judge, out, seed=4, log=lambda m: None)
  assert judge.asked == 12 and again["win_rate"] == result["win_rate"]


def test_bootstrap_interval_matches_the_normal_one_for_many_users():
  rng = np.random.default_rng(3)
  rates = rng.uniform(0.2, 1.0, 400)
  lo, hi = stats.bootstrap_mean_ci(rates, resamples=4000, seed=1)
  half = 1.959964 * rates.std(ddof=1) / np.sqrt(len(rates))
  assert lo == pytest.approx(rates.mean() - half, abs=0.004)
  assert hi == pytest.approx(rates.mean() + half, abs=0.004)
  assert stats.bootstrap_mean_ci([0.7] * 5) == (pytest.approx(0.7), pytest.approx(0.7))


def test_bad_flags_are_named(ppd):
  cases = winrate.user_cases(ppd, "unseen", 2, 1)
  with pytest.raises(winrate.WinrateError, match="--against='baseline'"):
    winrate.Opponent("baseline", ppd, cases)
  with pytest.raises(winrate.WinrateError, match="--users='all'"):
    winrate.user_cases(ppd, "all", 2, 1)
  with pytest.raises(winrate.WinrateError, match="two users"):
    winrate.Opponent("control", ppd, cases[:1])


def test_the_profile_caption_opponent_appends_each_users_profile(ppd, tmp_path, monkeypatch):
  cases = winrate.user_cases(ppd, "unseen", 2, 1)
  with pytest.raises(winrate.WinrateError, match="--against=profile_caption"):
    winrate.Opponent("profile_caption", ppd, cases)           # the demo's users have no text

  class Store:
    def profile(self, user_id):
      return f"bright {user_id}"
  monkeypatch.setattr(ppd.source, "store", Store(), raising=False)
  opponent = winrate.Opponent("profile_caption", ppd, cases)
  [path] = opponent.images(cases[1], str(tmp_path / "profile"), seed=4)
  zero = np.zeros((ppd.config.model.user_tokens, ppd.config.model.user_embed_dim), np.float32)
  caption = cases[1].prompts[0]
  augmented = f"{caption} User profile: bright {cases[1].user_id}"
  expected, plain = (inference.generate(ppd, [t], zero, user_scale=0.0, seed=4)[0]
                     for t in (augmented, caption))
  got = image_io.load_png(path)
  assert np.abs(got - (image_io.to_uint8(expected) / 127.5 - 1)).max() < 1e-6
  assert np.abs(got - (image_io.to_uint8(plain) / 127.5 - 1)).max() > 0.1


class Scripted:
  """A judge that answers from the users' hidden rewards, after `failing` calls whose answers are
  all invalid (as a server down or a refused key gives)."""
  name = "scripted"

  def __init__(self, source, failing: int = 0, temperature: float = 1.0):
    self.source, self.failing, self.temperature, self.asked = source, failing, temperature, 0

  def describe(self):
    return {"backend": "scripted", "temperature": self.temperature}

  def answer(self, requests):
    from ppd_jax.evals import judge as judge_lib
    self.asked += len(requests)
    if self.failing:
      self.failing -= 1
      return [judge_lib.Answer(None, problem="HTTP 503 after 5 retries")] * len(requests)
    out = []
    for r in requests:
      reward = hidden.HiddenPropertyReward(self.source, r.question.user_id)
      s = reward.score(np.stack([np.asarray(r.first), np.asarray(r.second)]), None)
      out.append(judge_lib.Answer(float(s[0] > s[1])))
    return out


def test_a_rerun_under_other_settings_is_refused_naming_the_fields(ppd, tmp_path):
  cases = winrate.user_cases(ppd, "unseen", 2, 1)
  out = str(tmp_path / "w")
  winrate.run(ppd, winrate.Opponent("base", ppd, cases), cases, Scripted(ppd.source), out,
              seed=4, log=lambda m: None)
  before = open(os.path.join(out, "verdicts.jsonl")).read()
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  assert manifest["fields"]["ppd"]["step"] == ppd.step
  assert len(manifest["fields"]["ppd"]["config_sha256"]) == 16
  for opponent, judge, field in (
      (winrate.Opponent("control", ppd, cases), Scripted(ppd.source), "against.spec"),
      (winrate.Opponent("base", ppd, cases), Scripted(ppd.source, temperature=0.5),
       "judge.temperature")):
    with pytest.raises(ValueError, match=field):
      winrate.run(ppd, opponent, cases, judge, out, seed=4, log=lambda m: None)
    assert judge.asked == 0
  with pytest.raises(ValueError, match="seed"):
    winrate.run(ppd, winrate.Opponent("base", ppd, cases), cases, Scripted(ppd.source), out,
                seed=5, log=lambda m: None)
  assert open(os.path.join(out, "verdicts.jsonl")).read() == before


def test_invalid_answers_are_counted_and_asked_again_on_the_rerun(ppd, tmp_path):
  cases = winrate.user_cases(ppd, "unseen", 2, 2)
  opponent = winrate.Opponent("base", ppd, cases)
  judge = Scripted(ppd.source, failing=2)             # one call per user: both users fail
  out = str(tmp_path / "w")
  first = winrate.run(ppd, opponent, cases, judge, out, seed=4, log=lambda m: None)
  assert first["invalid"] == 4 and first["users_with_a_verdict"] == 0
  assert first["win_rate"] is None and "4 of 4" in open(os.path.join(out, "winrate.md")).read()
  asked = judge.asked
  second = winrate.run(ppd, opponent, cases, judge, out, seed=4, log=lambda m: None)
  assert judge.asked - asked == 2 * 4                 # exactly the 4 invalid questions, both orders
  assert second["invalid"] == 0 and second["users_with_a_verdict"] == 2
  rows = winrate.judge_log.read(os.path.join(out, "verdicts.jsonl"), key="item")
  for c in cases:
    reward = hidden.HiddenPropertyReward(ppd.source, c.user_id)
    for r in rows[c.user_id].values():
      wins = reward.score([r["ppd"]])[0] > reward.score([r["opponent"]])[0]
      assert r["verdict"] == ("A" if wins else "B")
  third = winrate.run(ppd, opponent, cases, judge, out, seed=4, log=lambda m: None)
  assert judge.asked - asked == 8 and third["win_rate"] == second["win_rate"]


def _rows(verdicts, gaps=None):
  gaps = gaps or [None] * len(verdicts)
  return [{"verdict": v, "p_ab": None if v == "invalid" else 0.5, "p_ba": 0.5,
           "soft": None if v == "invalid" else 0.5, "bias": 0.0, "reward_gap": g}
          for v, g in zip(verdicts, gaps)]


def test_shared_prompts_are_resampled_too():
  """When every user judges the same prompts, a prompt that everyone's PPD image wins (or loses)
  moves every user's rate at once: the interval must resample prompts as well as users. Here
  four of six prompts are won by every user and two lost, so users alone look certain."""
  verdicts = ["A", "A", "B", "A", "B", "A"]
  by_user = {u: _rows(verdicts if u % 5 else verdicts[:-1] + ["inconsistent"])
             for u in range(30)}
  alone = win_rates.summarise(by_user, shared_items=False)
  both = win_rates.summarise(by_user, shared_items=True)
  assert alone["win_rate"] == both["win_rate"]
  width = lambda r: r["ci95"][1] - r["ci95"][0]
  assert width(alone) < 0.05 and width(both) > 0.3
  assert both["ci95"][0] <= both["win_rate"] <= both["ci95"][1]
  assert "two-way" in both["ci_method"] and "two-way" not in alone["ci_method"]


def test_sub_threshold_gaps_counted_as_ties_beside_the_rate():
  by_user = {1: _rows(["A", "A", "B", "invalid"], [0.1, 2.0, -1.0, 3.0]),
             2: _rows(["A", "inconsistent", "B"], [0.2, -0.3, -0.7])}
  r = win_rates.summarise(by_user, tie_gap=0.5)
  # user 1: tie, win, loss (the invalid clear pair left out) -> 1.5 / 3;
  # user 2: tie, tie, loss -> 1 / 3
  assert r["tie_counted"]["win_rate"] == pytest.approx((1.5 / 3 + 1 / 3) / 2)
  assert r["tie_counted"]["below_threshold"] == pytest.approx(3 / 6)
  assert r["win_rate"] == pytest.approx((2 / 3 + 1 / 2) / 2) and r["invalid"] == 1
  assert "sub-threshold gaps as ties" in win_rates.markdown({**r, "against": "base"})

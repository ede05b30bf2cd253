"""The demo's claim at test scale: PPD personalises for users it never saw, and the results file.

Runs the whole demo pipeline (pool, PPD, Diffusion-DPO baseline, evaluation) on the pretrained
demo base with fewer users, steps and evaluation items (configs/ppd.py:demo_quick).
"""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from configs import ppd
from ppd_jax.demo import pipeline
from ppd_jax.evals import judge_synthetic
from ppd_jax.evals import personalization
from ppd_jax.evals import win_rates


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  results = pipeline.run_demo(ppd.get_config("demo_quick"), workdir, log=_FIRST_LOG.append)
  return workdir, results


_FIRST_LOG = []


@pytest.fixture(scope="module")
def demo_rerun(demo_run):
  """The same command again on the finished demo: (its log, the trainer's lines, results)."""
  from ppd_jax import metrics as metrics_lib
  from ppd_jax import trainer
  workdir, _ = demo_run
  def refuse(*a, **k):
    raise AssertionError("trained, built or evaluated again")
  log, said = [], []
  with pytest.MonkeyPatch.context() as mp:
    for module, name in ((personalization, "evaluate"), (trainer.state_lib, "create_train_state"),
                         (trainer.step_lib, "make_train_step")):
      mp.setattr(module, name, refuse)
    mp.setattr(metrics_lib, "log", said.append)
    again = pipeline.run_demo(ppd.get_config("demo_quick"), workdir, log=log.append)
  return log, said, again


def test_a_rerun_redoes_nothing_and_prints_the_same_table(demo_run, demo_rerun):
  workdir, results = demo_run
  log, said, again = demo_rerun
  assert again == results
  table = personalization.format_table(results)
  assert table in _FIRST_LOG and table in log
  assert any("reusing it" in m for m in log), log
  steps = ppd.get_config("demo_quick").total_steps
  assert sum(f"finished at step {steps} (total_steps {steps}); nothing to do" in m
             for m in said) == 2, said                      # the PPD run and the baseline
  # What the kept results are bound to: another step or eval setting is not a match.
  made_by = pipeline.evaluation_inputs(ppd.get_config("demo_quick"), workdir)
  out = os.path.join(workdir, "eval")
  assert pipeline.kept_results(out, made_by) == results
  other_step = json.loads(json.dumps(made_by))
  other_step["runs"]["ppd"]["step"] -= 1
  other_eval = json.loads(json.dumps(made_by))
  other_eval["eval"]["num_items"] += 1
  assert pipeline.kept_results(out, other_step) is None
  assert pipeline.kept_results(out, other_eval) is None


def test_unseen_users_are_personalised_better_than_control(demo_run):
  _, r = demo_run
  assert r["unseen_user_win_rate"] > 0.6, r
  assert r["unseen_user_win_rate"] > r["control_win_rate"], r
  # Head to head with Diffusion-DPO, which sees the same pairs without the user.
  assert r["ppd_vs_dpo_win_rate"] > 0.5, r


def test_the_dpo_baseline_is_measured_not_forced(demo_run):
  """Diffusion-DPO learns the majority taste: it helps majority users more than minority ones,
  which a population without a majority (opposed couples) would hide at exactly 1/2."""
  _, r = demo_run
  g = r["groups"]
  assert set(g) == {"majority", "minority"} and g["minority"]["users"] >= 2, g
  assert g["majority"]["dpo_baseline_win_rate"] > g["minority"]["dpo_baseline_win_rate"], g
  assert g["minority"]["ppd_vs_dpo_win_rate"] > 0.5, g


def test_results_file_schema(demo_run):
  workdir, returned = demo_run
  path = os.path.join(workdir, "eval", "results.json")
  with open(path) as f:
    r = json.load(f)
  assert r == returned
  assert set(personalization.RESULT_KEYS) <= set(r)
  c = ppd.get_config("demo_quick")
  for key in ("unseen_user_win_rate", "train_user_win_rate", "dpo_baseline_win_rate",
              "ppd_vs_dpo_win_rate", "control_win_rate"):
    assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, key
    lo, hi = r["ci95"][key]
    assert lo <= r[key] <= hi, key
    assert math.isclose(r[key], np.mean([v for v in r["per_user"][key].values()
                                         if v is not None]), abs_tol=1e-3), key
  unseen = r["per_user"]["unseen_user_win_rate"]
  assert len(unseen) == r["counts"]["unseen_users"] == c.data.num_unseen_users
  for key in ("control_win_rate", "dpo_baseline_win_rate", "ppd_vs_dpo_win_rate", "group"):
    assert set(unseen) == set(r["per_user"][key]), key
  assert min(map(int, unseen)) >= c.data.num_users           # unseen ids are not training ids
  assert len(r["per_user"]["train_user_win_rate"]) == r["counts"]["train_users"] \
      == c.eval.train_users
  # Each group's numbers are the means over its own users.
  for group, g in r["groups"].items():
    ids = [u for u, gu in r["per_user"]["group"].items() if gu == group]
    assert g["users"] == len(ids)
    for key in personalization.HEAD_TO_HEAD:
      assert math.isclose(g[key], np.mean([r["per_user"][key][u] for u in ids]), abs_tol=1e-3)
      assert math.isclose(g["tie_counted"][key], np.mean(
          [r["tie_counted"][key]["per_user"][u] for u in ids]), abs_tol=1e-3)
  counts = r["judge"]["unseen_user_win_rate"]["counts"]
  assert sum(counts.values()) == len(unseen) * c.eval.num_items
  # The judge samples its answers at the users' threshold temperature; beside each rate the
  # rate with sub-threshold gaps as ties, over the same users.
  assert r["judge"]["temperature"] == pytest.approx(
      judge_synthetic.default_temperature(c.data.min_reward_gap))
  assert r["judge"]["verdict_from"] == "a sampled answer per order"
  assert set(r["tie_counted"]) == set(personalization.HEAD_TO_HEAD) | {
      "train_user_win_rate", "control_win_rate"}
  for key, t in r["tie_counted"].items():
    assert 0.0 <= t["win_rate"] <= 1.0 and 0.0 <= t["below_threshold"] <= 1.0, key
    assert t["min_reward_gap"] == c.data.min_reward_gap
    assert set(t["per_user"]) == set(r["per_user"][key]), key
  it = r["interpolation"]
  assert it["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert len(it["reward_user_a"]) == len(it["reward_user_b"]) == 5
  assert isinstance(it["monotone"], bool) and len(it["pairs"]) == r["counts"]["interpolation_pairs"]
  assert r["counts"]["ppd_step"] == r["counts"]["baseline_step"] == c.total_steps


def test_figures_are_written(demo_run):
  workdir, _ = demo_run
  for name in ("win_rates.png", "samples.png"):
    with Image.open(os.path.join(workdir, "eval", name)) as img:
      assert img.format == "PNG" and img.width > 200 and img.height > 200, name


def test_format_table_names_every_number():
  r = {"unseen_user_win_rate": 0.8, "train_user_win_rate": 0.9, "dpo_baseline_win_rate": 0.55,
       "ppd_vs_dpo_win_rate": 0.7, "control_win_rate": 0.4,
       "ci95": {"unseen_user_win_rate": [0.71, 0.86]},
       "groups": {"minority": {"users": 3, "unseen_user_win_rate": 0.66,
                               "dpo_baseline_win_rate": 0.21, "ppd_vs_dpo_win_rate": 0.77}},
       "interpolation": {"alphas": [0, .25, .5, .75, 1], "reward_user_a": [1, .5, 0, -.5, -1],
                         "reward_user_b": [-1, -.5, 0, .5, 1], "monotone": True}}
  r["tie_counted"] = {"dpo_baseline_win_rate": {"win_rate": 0.512, "below_threshold": 0.93}}
  table = personalization.format_table(r)
  assert "tie_counted 0.512 (93% of gaps below it)" in table
  for v in ("0.800", "0.900", "0.550", "0.700", "0.400", "0.710", "0.860", "minority (3",
            "0.660", "0.210", "0.770", "+1.000", "-1.000"):
    assert v in table, v
  assert "NOT monotone" not in table
  r["interpolation"]["monotone"] = False
  assert "NOT monotone" in personalization.format_table(r)


class _Users:
  """A stand-in source: user u's few-shot pairs (any images) and reward w_u . mean colour."""

  def __init__(self, weights):
    self.weights = np.asarray(weights, np.float32)
    rng = np.random.default_rng(0)
    self.pairs = rng.uniform(-1, 1, (4, 2, 4, 4, 3)).astype(np.float32)

  def fewshot_pairs(self, u):
    return {"winners": self.pairs[:, 0], "losers": self.pairs[:, 1], "captions": ["c"] * 4}

  def reward(self, u):
    w = self.weights[u]
    return type("R", (), {"score": lambda _, x, p: np.asarray(x).mean(axis=(1, 2)) @ w})()


def test_comparisons_are_each_users_reward_verdicts_averaged_over_users():
  """The judged win rate against a direct count: per user, the share of items where its reward
  ranks a above b (equal images give no verdict and are left out), then the mean over users."""
  users = _Users([[1, 0, 0], [0, -1, 0.5], [-1, 1, 1]])
  rng = np.random.default_rng(1)
  a = rng.uniform(-1, 1, (3, 6, 4, 4, 3)).astype(np.float32)
  b = rng.uniform(-1, 1, (6, 4, 4, 3)).astype(np.float32)
  b[2] = a[0, 2]                                    # user 0's item 2 is a tie
  judge = judge_synthetic.SyntheticJudge(users.reward, temperature=0.1, sample=False)
  compare = personalization._Comparer(judge, users, ["c"] * 6)
  got = compare([0, 1, 2], lambda u: [a[u]], lambda u: [b])
  want = {}
  for u in range(3):
    ra, rb = a[u].mean(axis=(1, 2)) @ users.weights[u], b.mean(axis=(1, 2)) @ users.weights[u]
    decided = ra != rb
    want[u] = float(np.mean(ra[decided] > rb[decided]))
  assert len(set(want.values())) > 1                # users differ, so the average is a test
  assert got["per_user"]["0"]["items"] == 6 and got["per_user"]["0"]["wins"] \
      + got["per_user"]["0"]["losses"] == 5
  for u in range(3):
    assert got["per_user"][str(u)]["win_rate"] == pytest.approx(want[u])
  assert got["win_rate"] == pytest.approx(np.mean(list(want.values())))
  # Several image sets per user (the control) pool every set's verdicts for that user.
  pooled = compare([1], lambda u: [a[0], a[2]], lambda u: [b, b])
  r0, r2, rb = (x.mean(axis=(1, 2)) @ users.weights[1] for x in (a[0], a[2], b))
  wins = np.concatenate([r0 > rb, r2 > rb])[np.concatenate([r0 != rb, r2 != rb])]
  assert pooled["per_user"]["1"]["items"] == 12 and len(wins) == 11
  assert pooled["per_user"]["1"]["win_rate"] == pytest.approx(np.mean(wins))


def test_interpolation_pairs_users_of_different_but_not_mirrored_tastes():
  w = np.array([[1.0, 0.0], [-1.0, 0.0], [-0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
  pairs = personalization.opposed_pairs([0, 1, 2, 3, 4], w, 2)
  assert pairs[0] == (0, 2)          # least like user 0 short of its mirror image, user 1
  assert pairs[1] == (1, 4)          # then user 1 with the least like it among 3 and 4
  assert personalization.opposed_pairs([0, 1], w, 3) == [(0, 1)]   # only the mirror is left


class _Corner:
  """A reward read off one pixel (the gap a question is built with); the other pixels are noise,
  so every question's images differ (and so do the judge's draws)."""

  def score(self, images, prompts):
    return np.asarray(images, np.float64)[:, 0, 0, 0]


def _gap_questions(gaps, seed=0, user=0):
  """One question per gap: r(a) - r(b) = gap under _Corner."""
  from ppd_jax.evals import judge as judge_lib
  rng = np.random.default_rng(seed)
  context = judge_lib.context_from_pairs(*np.zeros((2, 1, 2, 2, 3), np.float32), ["c"])
  out = []
  for g in gaps:
    a, b = rng.uniform(-1, 1, (2, 2, 2, 3)).astype(np.float32)
    a[0, 0, 0], b[0, 0, 0] = g / 2, -g / 2
    out.append(judge_lib.Question(context, "c", a, b, user_id=user))
  return out


def _ask(judge, questions):
  from ppd_jax.evals import judge as judge_lib
  return judge.answer([r for q in questions for r in judge_lib.requests_for(q)])


def test_sampled_answers_follow_the_judge_probability_per_order():
  """Each order's answer is a 1 or a 0 drawn with P(first) = sigmoid(gap / T): the share of
  "first" answers at each gap matches it within 4 binomial standard errors, in both orders."""
  t, n = 0.25, 1500
  judge = judge_synthetic.SyntheticJudge(lambda u: _Corner(), temperature=t)
  for gap in (0.0, 0.5 * t, t, 2 * t):
    answers = _ask(judge, _gap_questions([gap] * n, seed=int(gap * 100)))
    assert {a.p_first for a in answers} == {0.0, 1.0}
    for order, sign in ((0, 1.0), (1, -1.0)):          # A first: r(first) - r(second) = +gap
      p = 1 / (1 + math.exp(-sign * gap / t))
      share = np.mean([a.p_first for a in answers[order::2]])
      assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), (gap, order, share, p)
      assert [a.reward_gap for a in answers[order::2]] == pytest.approx([sign * gap] * n, abs=1e-6)


def test_inconsistent_verdicts_for_small_gaps_only():
  """Near-equal images get the two orders' answers apart about half the time (both draws are
  fair coins), which the consistency rule drops; a gap of 20 T never does."""
  from ppd_jax.evals import judge as judge_lib
  t, n = 0.2, 800
  judge = judge_synthetic.SyntheticJudge(lambda u: _Corner(), temperature=t)
  close = judge_lib.judge(judge, _gap_questions([0.0] * n, seed=1))
  share = np.mean([j.verdict == "inconsistent" for j in close])
  assert abs(share - 0.5) < 4 * math.sqrt(0.25 / n), share
  far = judge_lib.judge(judge, _gap_questions([20 * t] * n + [-20 * t] * n, seed=2))
  assert [j.verdict for j in far] == ["A"] * n + ["B"] * n


def test_sampled_verdicts_are_the_same_on_a_rerun():
  """Draws are seeded by (seed, user, caption, images): a new judge asks again and gets the same
  answers; another judge seed or another user gets other ones."""
  questions = _gap_questions([0.0] * 200, seed=3)
  make = lambda seed: judge_synthetic.SyntheticJudge(lambda u: _Corner(), 0.2, seed=seed)
  first = [a.p_first for a in _ask(make(0), questions)]
  assert first == [a.p_first for a in _ask(make(0), questions)]
  assert first != [a.p_first for a in _ask(make(1), questions)]
  other_user = _gap_questions([0.0] * 200, seed=3, user=1)
  assert first != [a.p_first for a in _ask(make(0), other_user)]


class _Run:
  """What for_run reads of a trained run: its config and its users."""

  def __init__(self, source="synthetic", min_reward_gap=0.5):
    from ml_collections import ConfigDict
    self.config = ConfigDict({"data": {"source": source, "min_reward_gap": min_reward_gap}})
    self.source = type("S", (), {"user_reward": lambda *_: None, "check_user": lambda *_: None})()


def test_the_judge_temperature_follows_the_users_threshold_unless_given():
  """Default: a gap equal to data.min_reward_gap is answered right with P = 0.9 per order, so
  T = gap / ln 9 (config and for_run alike); a temperature given explicitly is used as it is."""
  assert judge_synthetic.for_run(_Run(min_reward_gap=0.8)).temperature == pytest.approx(
      0.8 / math.log(9))
  assert 1 / (1 + math.exp(-0.8 / judge_synthetic.default_temperature(0.8))) == pytest.approx(0.9)
  assert judge_synthetic.for_run(_Run(), temperature=0.37, seed=5).temperature == 0.37
  assert judge_synthetic.for_run(_Run(), seed=5).seed == 5
  c = ppd.get_config("demo")
  assert c.eval.judge_temperature == pytest.approx(c.data.min_reward_gap / math.log(9))
  c.data.min_reward_gap = 1.2                       # the rule follows the threshold ...
  assert c.eval.judge_temperature == pytest.approx(1.2 / math.log(9))
  c.eval.judge_temperature = 0.05                   # ... until a value is given
  c.data.min_reward_gap = 0.3
  assert c.eval.judge_temperature == 0.05
  with pytest.raises(ValueError, match="--judge=synthetic"):
    judge_synthetic.for_run(_Run(source="pickapic"))


def test_tie_counted_rate_against_a_count_by_hand():
  """Per question 1/2 where |r_u(a) - r_u(b)| < data.min_reward_gap, else the verdict (here the
  reward's own ranking: T tiny, probabilities not draws), per user, then over users; counted by
  hand from the rewards. User 1 judges two image sets, so the mean over users is not the mean
  over questions."""
  users = _Users([[1, 0, 0], [0, -1, 0.5], [-1, 1, 1]])
  rng = np.random.default_rng(4)
  a = rng.uniform(-1, 1, (3, 12, 4, 4, 3)).astype(np.float32)
  b = rng.uniform(-1, 1, (12, 4, 4, 3)).astype(np.float32)
  judge = judge_synthetic.SyntheticJudge(users.reward, temperature=1e-4, sample=False)
  sets = lambda u: [a[u], a[0]] if u == 1 else [a[u]]
  got = personalization._Comparer(judge, users, ["c"] * 12)([0, 1, 2], sets,
                                                            lambda u: [b] * len(sets(u)))
  min_gap = 0.15
  tie = win_rates.tie_counted_win_rate(got["rows"], min_gap)
  want, below = {}, 0
  for u in range(3):
    gap = np.concatenate([x.mean(axis=(1, 2)) @ users.weights[u]
                          - b.mean(axis=(1, 2)) @ users.weights[u] for x in sets(u)])
    small = np.abs(gap) < min_gap
    below += small.sum()
    want[u] = np.mean(np.where(small, 0.5, (gap > 0).astype(float)))
  assert 0 < below < 48                             # both kinds of question occur
  assert len(set(want.values())) > 1
  for u in range(3):
    assert tie["per_user"][str(u)] == pytest.approx(want[u])
  assert tie["win_rate"] == pytest.approx(np.mean(list(want.values())))
  assert tie["below_threshold"] == pytest.approx(below / 48)
  assert tie["win_rate"] != pytest.approx(got["win_rate"])

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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  results = pipeline.run_demo(ppd.get_config("demo_quick"), workdir, log=lambda _: None)
  return workdir, results


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
  counts = r["judge"]["unseen_user_win_rate"]["counts"]
  assert sum(counts.values()) == len(unseen) * c.eval.num_items
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
  table = personalization.format_table(r)
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
  judge = judge_synthetic.SyntheticJudge(users.reward, temperature=0.1)
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

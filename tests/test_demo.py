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
  assert r["unseen_user_win_rate"] > r["dpo_baseline_win_rate"], r


def test_results_file_schema(demo_run):
  workdir, returned = demo_run
  path = os.path.join(workdir, "eval", "results.json")
  with open(path) as f:
    r = json.load(f)
  assert r == returned
  assert set(personalization.RESULT_KEYS) <= set(r)
  c = ppd.get_config("demo_quick")
  for key in ("unseen_user_win_rate", "train_user_win_rate", "dpo_baseline_win_rate",
              "control_win_rate"):
    assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, key
  unseen = r["per_user"]["unseen"]
  assert len(unseen) == r["counts"]["unseen_users"] == c.data.num_unseen_users
  assert set(unseen) == set(r["per_user"]["control"]) == set(r["per_user"]["dpo_baseline"])
  assert min(map(int, unseen)) >= c.data.num_users           # unseen ids are not training ids
  assert len(r["per_user"]["train"]) == r["counts"]["train_users"] == c.eval.train_users
  assert math.isclose(r["unseen_user_win_rate"], np.mean(list(unseen.values())), abs_tol=1e-3)
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
  r = {"unseen_user_win_rate": 0.8, "train_user_win_rate": 0.9, "dpo_baseline_win_rate": 0.5,
       "control_win_rate": 0.4,
       "interpolation": {"alphas": [0, .25, .5, .75, 1], "reward_user_a": [1, .5, 0, -.5, -1],
                         "reward_user_b": [-1, -.5, 0, .5, 1], "monotone": True}}
  table = personalization.format_table(r)
  for v in ("0.800", "0.900", "0.500", "0.400", "+1.000", "-1.000"):
    assert v in table
  assert "NOT monotone" not in table
  r["interpolation"]["monotone"] = False
  assert "NOT monotone" in personalization.format_table(r)


def test_win_rate_counts_ties_half():
  assert personalization.win_rate(np.array([1.0, 2.0, 3.0, 4.0]),
                                  np.array([0.0, 2.0, 5.0, 1.0])) == pytest.approx(0.625)


def test_interpolation_pairs_users_of_different_but_not_mirrored_tastes():
  w = np.array([[1.0, 0.0], [-1.0, 0.0], [-0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
  pairs = personalization.opposed_pairs([0, 1, 2, 3, 4], w, 2)
  assert pairs[0] == (0, 2)          # least like user 0 short of its mirror image, user 1
  assert pairs[1] == (1, 4)          # then user 1 with the least like it among 3 and 4
  assert personalization.opposed_pairs([0, 1], w, 3) == [(0, 1)]   # only the mirror is left

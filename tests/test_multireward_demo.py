"""Section 5.1 on a laptop (ppd_jax.demo.multireward, demo_world/synthetic_reward_users.py):
the reward users' labels against the rewards written out here, their partial conflict, their
embeddings, the rows' configs, and the whole experiment at test size with the claims docs/table1.md
makes."""
import os

import numpy as np
import pytest

from configs import ppd
from ppd_jax import config_validation
from ppd_jax.demo_world import shape_properties
from ppd_jax.demo_world import synthetic_reward_users as sru
from ppd_jax.demo import multireward
from ppd_jax.users import fewshot

# The rewards, written out: (size, brightness, background) weights before normalising.
WRITTEN = {"vivid": (1, 1, 0), "airy": (-1, 0, 1), "contrast": (0, 1, -1)}


def quick(**data):
  c = ppd.get_config("demo_multireward_quick")
  for k, v in data.items():
    setattr(c.data, k, v)
  config_validation.prepare(c)
  return c


@pytest.fixture(scope="module")
def source():
  return sru.RewardUserPreferences(quick(user_sample="random"), log=lambda m: None)


def _rewards(source, images):
  """Each written-out reward of images, from the measured properties standardised over the pool."""
  cols = [shape_properties.PROPERTIES.index(p) for p in ("size", "brightness", "background")]
  pool = shape_properties.measure(source.pool_images)[:, cols]
  x = (shape_properties.measure(images)[:, cols] - pool.mean(0)) / pool.std(0)
  return {n: x @ (np.array(w) / np.linalg.norm(w)) for n, w in WRITTEN.items()}


def test_labels_are_the_rewards_and_the_rewards_partly_conflict(source):
  r = _rewards(source, source.pool_images)
  corr = np.corrcoef(np.stack([r[n] for n in source.names]))
  off = corr[np.triu_indices(3, 1)]
  assert (np.abs(off) < 0.8).all() and off.min() < -0.1 and off.max() > 0.1, corr
  batch = source.gather(np.arange(len(source)))
  assert sorted(set(batch["user_id"].tolist())) == [-3, -2, -1]
  for k, n in enumerate(source.names):
    mine = batch["user_id"] == -(k + 1)
    win = _rewards(source, source.pool_images[source.winner_index[k]])[n]
    lose = _rewards(source, source.pool_images[source.loser_index[k]])[n]
    assert (win > lose).all()                            # every label is the reward's own
    np.testing.assert_array_equal(batch["preferred"][mine],
                                  source.pool_latents[source.winner_index[k]])
    np.testing.assert_allclose(source.user_reward(-(k + 1), source.pool_images[:20]),
                               r[n][:20], atol=1e-4)
  # No one model serves all three: the best image for one reward is not the best for another.
  best = {n: int(np.argmax(r[n])) for n in source.names}
  assert len(set(best.values())) == 3


def test_embeddings_rows_and_bad_configs(source):
  k = 1
  win, lose = source.winner_index[k][:4], source.loser_index[k][:4]
  direct = fewshot.embed_user(source.pool_images[win], source.pool_images[lose],
                              [source.captions[c] for c in source.pool_caption_ids[win]],
                              4, 16)
  np.testing.assert_array_equal(source.user_embedding(-2), direct)
  batch = source.gather(np.arange(len(source)))
  mine = batch["user_embedding"][batch["user_id"] == -2]
  distinct = np.unique(mine.reshape(len(mine), -1), axis=0)
  assert 3 <= len(distinct) <= quick().data.user_samples        # random: several 4-pair samples
  first = sru.RewardUserPreferences(quick(user_sample="first"), log=lambda m: None)
  e = first.gather(np.arange(len(first)))
  assert (e["user_embedding"][e["user_id"] == -2] == direct).all()
  one = sru.RewardUserPreferences(multireward.row_config(quick(), "dpo_airy"), log=lambda m: None)
  assert set(one.gather(np.arange(len(one)))["user_id"].tolist()) == {-2}
  assert len(one) == len(source) // 3
  dpo = sru.RewardUserPreferences(multireward.row_config(quick(), "diffusion_dpo"),
                                  log=lambda m: None)
  b = dpo.gather(np.arange(0, len(dpo), 50))["user_embedding"]
  assert (b == b[:1]).all()                                       # no user information
  assert multireward.row_config(quick(), "sft").loss == "sft"
  for field, value, message in (("reward_users", ("vivid", "clip"), "data.reward_users"),
                                ("relabel_rewards", "pickscore", "data.relabel_rewards"),
                                ("user_sample", "all", "data.user_sample")):
    c = ppd.get_config("demo_multireward_quick")
    setattr(c.data, field, value)
    with pytest.raises(config_validation.ConfigError, match=message):
      config_validation.prepare(c)
  with pytest.raises(KeyError, match="reward users are -1 \\(vivid\\)"):
    source.user_embedding(5)
  # Validation pairs (eval_every > 0): a separate draw of the trained reward users, labelled alike.
  held = one.held_out()
  h = held.gather(np.arange(len(held)))
  assert set(h["user_id"].tolist()) == {-2} and (h["pair"] >= len(one)).all()
  win = _rewards(source, source.pool_images[source.held_winner[1]])["airy"]
  lose = _rewards(source, source.pool_images[source.held_loser[1]])["airy"]
  assert (win > lose).all()
  np.testing.assert_array_equal(h["preferred"], one.pool_latents[one.held_winner[1]])
  np.testing.assert_array_equal(source.held_winner, one.held_winner)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """The laptop experiment at test size (configs/ppd.py:demo_multireward_quick)."""
  workdir = str(tmp_path_factory.mktemp("multireward"))
  c = ppd.get_config("demo_multireward_quick")
  return workdir, multireward.run(c, workdir, log=lambda m: None)


FIGURES = "<!-- figures: demo_multireward_quick -->"


def readme_figures() -> dict:
  """docs/table1.md's test-size table (after the FIGURES marker): {row: {reward: mean}}."""
  readme = os.path.join(os.path.dirname(__file__), "..", "docs", "table1.md")
  with open(readme, encoding="utf-8") as f:
    block = f.read().split(FIGURES, 1)[1].strip().split("\n\n", 1)[0]
  lines = [line.strip().strip("|").split("|") for line in block.splitlines()]
  header = [c.strip() for c in lines[0]]
  return {cells[0].strip().strip("`"): {r: float(cells[i]) for i, r in enumerate(header) if i}
          for cells in lines[2:]}


def test_the_experiment_at_test_size(experiment, monkeypatch):
  """The claims docs/table1.md makes for the laptop experiment, at test size, and its own
  test-size figures: training and evaluation are deterministic on a CPU, so a change that moves
  a figure fails here until the page is re-measured."""
  workdir, results = experiment
  t, rewards = results["table"], ("vivid", "airy", "contrast")
  printed = readme_figures()
  assert set(printed) == set(t), (sorted(printed), sorted(t))
  for row, cells in printed.items():
    for r, v in cells.items():
      assert abs(t[row][r] - v) <= 0.005, (row, r, t[row][r], v)
  for r in rewards:
    assert t["ppd"][r] > t["diffusion_dpo"][r], (r, t)
    assert t["ppd"][r] > t["base"][r], (r, t)
    # SFT, unanchored by a reference, drifts to big shapes on light grounds: vivid's direction,
    # so on vivid it can match PPD (docs/table1.md, "On a laptop"); on the other two it falls below base.
    if r != "vivid":
      assert t["ppd"][r] > t["sft"][r] and t["sft"][r] < t["base"][r], (r, t)
    # Within the stated distance of the single-reward upper bound: at least a third of its gain.
    assert results["upper_bound_share"][r] >= multireward.UPPER_BOUND_SHARE, results
  assert all(results["edges_monotone"].values()), results["edges_monotone"]
  for f in ("results.json", "table1/table1.json", "table1/table1.md", "interpolation/grid.png",
            "interpolation/edges.png", "interpolation/edges.json"):
    assert os.path.getsize(os.path.join(workdir, f)) > 0

  # Rerun: every run restored, every image and score read back, nothing made again.
  from ppd_jax import inference
  def refuse(*a, **k):
    raise AssertionError("generated again")
  monkeypatch.setattr(inference, "generate", refuse)
  monkeypatch.setattr(inference, "generate_mixes", refuse)
  again = multireward.run(ppd.get_config("demo_multireward_quick"), workdir, log=lambda m: None)
  assert again["table"] == results["table"]

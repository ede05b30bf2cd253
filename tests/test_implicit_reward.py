"""evals/implicit_reward.evaluate_pairs draws t as training does (the schedule's own draw_t), so
it runs on Stable Cascade's continuous t as on SD's integer t, and is reproducible by seed."""
import jax
import ml_collections
import numpy as np
import pytest
import tiny_runs

import tiny_cascade as tc
from ppd_jax.diffusion import cascade_schedule
from ppd_jax.diffusion import schedules
from ppd_jax.evals import implicit_reward
from ppd_jax.models import build_model, init_params, split_params
from ppd_jax.models import cascade
from ppd_jax.models import personalized_cascade as pc

PAIRS, BATCH, DRAWS = 6, 3, 2     # two batches of one shape: one compile per evaluation
CALLS = DRAWS * (PAIRS // BATCH)  # draw_t calls per evaluation


def _random_user(user, seed):
  """The user branch initialises to_v_user to zero (z = 0 for every t); random values make z
  depend on t and eps, so a different draw gives different metrics."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(np.float32), user)


def _spy_draw_t(monkeypatch, schedule_cls) -> list:
  """Records every t that schedule_cls.draw_t returns (the draw runs eagerly, outside jit)."""
  drawn, original = [], schedule_cls.draw_t

  def spy(self, key, batch_size):
    t = original(self, key, batch_size)
    drawn.append(np.asarray(t))
    return t
  monkeypatch.setattr(schedule_cls, "draw_t", spy)
  return drawn


@pytest.fixture(scope="module")
def tiny_sd():
  c = tiny_runs.tiny_config()
  model = build_model(c.model)
  base, user = split_params(init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(1)
  s, m = c.model.sample_size, c.model
  img = lambda: rng.uniform(-1, 1, (PAIRS, s, s, m.in_channels)).astype(np.float32)
  pairs = {"preferred": img(), "dispreferred": img(),
           "text_embedding": rng.standard_normal(
               (PAIRS, c.data.text_length, m.cross_attention_dim)).astype(np.float32),
           "user_embedding": rng.standard_normal(
               (PAIRS, m.user_tokens, m.user_embed_dim)).astype(np.float32)}
  return dict(model=model, schedule=schedules.schedule_from_config(c.diffusion), config=c,
              base=base, user=_random_user(user, 2), pairs=pairs)


def _evaluate(run, seed):
  return implicit_reward.evaluate_pairs(run["model"], run["schedule"], run["config"], run["base"],
                                        run["user"], run["pairs"], draws=DRAWS,
                                        batch_size=BATCH, seed=seed)


def test_sd_draws_integer_t_through_the_schedule_and_repeats_by_seed(tiny_sd, monkeypatch):
  drawn = _spy_draw_t(monkeypatch, schedules.NoiseSchedule)
  first = _evaluate(tiny_sd, seed=0)
  t = np.concatenate(drawn)
  assert len(drawn) == CALLS and t.shape == (DRAWS * PAIRS,)
  assert np.issubdtype(t.dtype, np.integer)
  assert t.min() >= 0 and t.max() < tiny_sd["schedule"].num_train_timesteps
  assert len(np.unique(t)) > 1

  again = _evaluate(tiny_sd, seed=0)
  np.testing.assert_array_equal(np.concatenate(drawn[CALLS:]), t)   # the same draws
  assert again == first                                            # exactly
  other = _evaluate(tiny_sd, seed=1)
  assert not np.array_equal(np.concatenate(drawn[2 * CALLS:]), t)
  assert other["loss"] != first["loss"]
  assert abs(first["loss"] - np.log(2)) > 1e-4, "the random user branch should move the loss"


def test_stable_cascade_draws_continuous_t_and_runs(monkeypatch):
  user_dim = 12
  cfg = cascade.config_from_diffusers(tc.TINY_C, user_embed_dim=user_dim, user_tokens=2)
  model = pc.PersonalizedCascade(cfg)
  base, user = split_params(init_params(model, jax.random.key(3)))
  schedule = cascade_schedule.CascadeSchedule()
  config = ml_collections.ConfigDict({"model": {"family": "cascade"}, "loss": "dpo",
                                      "dpo": {"beta": 500.0, "reduction": "mean"}})
  rng = np.random.default_rng(4)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  pairs = {"preferred": f(PAIRS, 4, 4, 16), "dispreferred": f(PAIRS, 4, 4, 16),
           "text_embedding": f(PAIRS, 5, 24), "pooled_text_embedding": f(PAIRS, 24),
           "user_embedding": f(PAIRS, 1, user_dim)}
  drawn = _spy_draw_t(monkeypatch, cascade_schedule.CascadeSchedule)
  out = implicit_reward.evaluate_pairs(model, schedule, config, base, _random_user(user, 5),
                                       pairs, draws=DRAWS, batch_size=BATCH, seed=0)
  t = np.concatenate(drawn)
  assert t.shape == (DRAWS * PAIRS,) and t.dtype == np.float32
  assert (t > schedule.t_min).all() and (t <= 1.0).all()
  assert len(np.unique(t)) == len(t)               # continuous: no two pairs share a t
  assert np.isfinite(out["loss"]) and 0.0 <= out["implicit_accuracy"] <= 1.0
  assert abs(out["loss"] - np.log(2)) > 1e-4, "the random user branch should move the loss"

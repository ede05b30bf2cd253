"""Validation while training: fixed held-out pairs of users never trained on, fixed t and noise,
val/* in metrics.jsonl and TensorBoard."""
import json
import os

import jax
import numpy as np
import pytest
import tiny_runs

from ppd_jax import sharding as shd
from ppd_jax import state as state_lib
from ppd_jax import step as step_lib
from ppd_jax import trainer
from ppd_jax import validation
from ppd_jax import sources
from ppd_jax.diffusion import schedules
from ppd_jax.models import build_model


def _tiny(**overrides):
  return tiny_runs.tiny_config(**{"eval_every": 2, "eval.val_pairs": 16, **overrides})


def test_aggregate_is_the_loss_and_tie_aware_accuracy_in_numpy():
  z = np.array([2.0, -1.0, 0.0, 0.0, 30.0, -0.5])
  got = validation.aggregate(z)
  np.testing.assert_allclose(got["val/loss"], np.mean(np.log1p(np.exp(-z))), rtol=1e-12)
  assert got["val/implicit_accuracy"] == pytest.approx((1 + 0 + 0.5 + 0.5 + 1 + 0) / 6)
  assert got["val/reward_margin"] == pytest.approx(z.mean())
  assert got["val/pairs"] == 6


@pytest.fixture(scope="module")
def world():
  c = _tiny()
  mesh = shd.make_mesh(-1, 1)
  model = build_model(c.model)
  tx, _ = step_lib.make_optimizer(c)
  state, base, st_sh, base_sh = state_lib.create_train_state(model, tx, mesh, c.seed)
  source = sources.build_source(c)
  held_out = sources.build_held_out(c, source)
  v = validation.Validator(c, model, schedules.schedule_from_config(c.diffusion), mesh, st_sh,
                           base_sh, held_out, log=lambda _: None)
  return c, v, state, base, source, held_out


def test_held_out_pairs_belong_to_unseen_users_only(world):
  c, v, _, _, source, held_out = world
  unseen = set(source.unseen_user_ids.tolist())
  ids = held_out.gather(np.arange(len(held_out)))["user_id"]
  assert set(ids.tolist()) == unseen
  assert not set(source.gather(np.arange(len(source)))["user_id"].tolist()) & unseen
  assert len(v._batches) == c.eval.val_pairs // c.batch_size


def test_at_initialisation_every_pair_ties(world):
  """The user branch starts as the identity, so z = 0 for every pair: loss log 2 and accuracy
  0.5 exactly (ties count half; with `z > 0` alone it would read 0)."""
  _, v, state, base, _, _ = world
  got = v(state, base)
  assert got["val/loss"] == pytest.approx(np.log(2.0), abs=1e-7)
  assert got["val/implicit_accuracy"] == 0.5
  assert got["val/pairs"] == 16


def test_the_same_state_scores_the_same_and_another_state_differently(world):
  _, v, state, base, _, _ = world
  rng = np.random.default_rng(0)
  moved = state.replace(user_params=jax.tree.map(
      lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), state.user_params))
  a, b = v(moved, base), v(moved, base)
  assert a == b                       # fixed pairs, t and noise
  assert a["val/loss"] != pytest.approx(np.log(2.0), abs=1e-4)


def test_trainer_writes_val_rows_every_eval_every_steps(tmp_path):
  workdir = str(tmp_path)
  trainer.train_and_evaluate(_tiny(total_steps=5), workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  val = [r for r in rows if "val/loss" in r]
  assert [r["step"] for r in val] == [2, 4, 5]
  assert all(set(r) == {"step", "val/loss", "val/implicit_accuracy", "val/reward_margin",
                        "val/pairs"} for r in val)
  assert len({r["val/loss"] for r in val}) == 3, "the curve should move as the branch trains"
  assert len([r for r in rows if "loss" in r]) == 5


def test_validation_uses_whole_batches_and_refuses_fewer_pairs_than_devices(world):
  c, _, state, base, _, held_out = world
  model = build_model(c.model)
  mesh = shd.make_mesh(-1, 1)
  tx, _ = step_lib.make_optimizer(c)
  _, _, st_sh, base_sh = state_lib.create_train_state(model, tx, mesh, c.seed)
  sched = schedules.schedule_from_config(c.diffusion)
  twelve = _tiny(**{"eval.val_pairs": 12})
  v = validation.Validator(twelve, model, sched, mesh, st_sh, base_sh, held_out, lambda _: None)
  assert v(state, base)["val/pairs"] == 8           # whole batches of 8 (the micro-batch)
  from ppd_jax import config_validation
  four = _tiny(**{"eval.val_pairs": 4})              # fewer than the 8 devices
  with pytest.raises(config_validation.ConfigError, match=r"config\.eval_every=0"):
    validation.Validator(four, model, sched, mesh, st_sh, base_sh, held_out, lambda _: None)

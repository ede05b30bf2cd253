"""The jitted train step on the tiny UNet: initial loss, frozen base, sharding, accumulation."""
import jax
import numpy as np
import pytest
import tiny_runs

from ppd_jax import sharding as shd
from ppd_jax import step as step_lib
from ppd_jax.diffusion import schedules
from ppd_jax.models import build_model, init_params, split_params


def _config(**overrides):
  return tiny_runs.tiny_config(**{"dpo.beta": 2000.0, "optim.lr": 1e-3, "optim.warmup_steps": 0,
                                  **overrides})


_batch = tiny_runs.random_batch


def _run(c, mesh, steps=3):
  """Returns (base before, base after, user params, per-step metrics) after `steps` steps."""
  state, base, fn = tiny_runs.train_step_for(c, mesh)
  base_before = jax.device_get(base)
  key = jax.random.key(7)
  history = []
  for i in range(steps):
    batch = shd.global_batch(_batch(c, seed=i), mesh)
    state, m = fn(state, base, batch, key)
    history.append(jax.device_get(m))
  return base_before, jax.device_get(base), jax.device_get(state.user_params), history


@pytest.fixture(scope="module")
def single_device_run():
  c = _config()
  return _run(c, shd.make_mesh(1, 1, devices=jax.devices()[:1]))


def test_initial_loss_is_log2_and_policy_equals_reference(single_device_run):
  _, _, _, history = single_device_run
  first = history[0]
  # Step 0 metrics are computed before the update: the zero-initialised user branch is the
  # identity, so policy errors equal reference errors exactly.
  assert first["loss"] == pytest.approx(np.log(2.0), abs=1e-7)
  assert first["policy_err_preferred"] == first["reference_err_preferred"]
  assert first["policy_err_dispreferred"] == first["reference_err_dispreferred"]
  assert first["reward_margin"] == 0.0
  # ...and after an update the policy has moved.
  assert history[1]["loss"] != pytest.approx(np.log(2.0), abs=1e-6)


def test_frozen_base_is_bit_identical_after_training(single_device_run):
  before, after, _, _ = single_device_run
  jax.tree.map(np.testing.assert_array_equal, before, after)


def _grads(c, batch, user, base, t, noise):
  model = build_model(c.model)
  fn = jax.jit(step_lib.make_grad_fn(model, schedules.schedule_from_config(c.diffusion), c))
  return jax.device_get(fn(user, base, batch, t, noise))


def test_gradient_accumulation_equals_one_big_batch():
  """2 micro-batches of 4 pairs give the gradient (and grad_norm) of one batch of 8: the sum of
  the micro-batch gradients divided by their number. Compared before the optimizer, since Adam
  is blind to a constant factor on the gradient (a missing `/ accum` would pass after Adam)."""
  # beta 50, not the 2000 of the other tests: at 2000 float noise in the errors, amplified by
  # beta / 2, moves single gradient entries by ~1e-4 of their leaf between batch shapes.
  c = _config(**{"dpo.beta": 50.0})
  model = build_model(c.model)
  params = jax.device_get(init_params(model, jax.random.key(3)))
  base, user = split_params(params)
  # A non-zero user branch, so that every user param has a gradient.
  rng = np.random.default_rng(5)
  user = jax.tree.map(lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), user)
  batch = _batch(c, seed=11)
  t = np.asarray(rng.integers(0, 1000, size=c.batch_size), np.int32)
  noise = rng.standard_normal(batch["preferred"].shape).astype(np.float32)
  g1, m1 = _grads(c, batch, user, base, t, noise)
  g2, m2 = _grads(_config(grad_accum_steps=2, **{"dpo.beta": 50.0}), batch, user, base, t, noise)
  norm = lambda g: np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(g)))
  assert norm(g1) > 1e-3
  np.testing.assert_allclose(norm(g2), norm(g1), rtol=1e-5)
  # Each leaf to 2e-5 of its largest entry (measured: at most 5e-6).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0,
                                                       atol=2e-5 * np.abs(b).max()), g2, g1)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)


def test_accumulated_step_reports_the_big_batch_grad_norm(single_device_run):
  """The step's own grad_norm metric with 2 micro-batches equals the one-batch run's."""
  c = _config(grad_accum_steps=2)
  _, _, _, hist = _run(c, shd.make_mesh(2, 1, devices=jax.devices()[:2]), steps=1)
  _, _, _, hist1 = single_device_run
  np.testing.assert_allclose(hist[0]["grad_norm"], hist1[0]["grad_norm"], rtol=1e-5)
  assert hist1[0]["grad_norm"] > 0


def test_bf16_and_remat_step_runs_close_to_fp32(single_device_run):
  c = _config(**{"model.dtype": "bfloat16", "model.remat": True})
  _, _, _, hist = _run(c, shd.make_mesh(1, 1, devices=jax.devices()[:1]), steps=2)
  _, _, _, hist32 = single_device_run
  assert hist[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
  assert np.isfinite(hist[1]["loss"])
  np.testing.assert_allclose(hist[0]["reference_err_preferred"],
                             hist32[0]["reference_err_preferred"], rtol=5e-2)


@pytest.mark.parametrize("field", ["user_embedding", "preferred"])
def test_a_nonfinite_batch_changes_nothing_and_is_counted(field):
  """One NaN (a bad user embedding) or inf (an overflowed latent) in one pair: the update is
  skipped, params and optimizer state stay bit for bit, the step is counted; the next clean
  batch trains normally."""
  c = _config()
  mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
  state, base, fn = tiny_runs.train_step_for(c, mesh)
  key = jax.random.key(7)
  state, _ = fn(state, base, shd.global_batch(_batch(c, seed=0), mesh), key)   # a real update
  before = jax.device_get(state)
  bad = _batch(c, seed=1)
  bad[field][3].flat[5] = np.nan if field == "user_embedding" else np.inf
  state, m = fn(state, base, shd.global_batch(bad, mesh), key)
  after = jax.device_get(state)
  assert not np.isfinite(m["loss"]) or not np.isfinite(m["grad_norm"])
  assert int(m["skipped_updates"]) == 1 and int(m["nonfinite_streak"]) == 1
  jax.tree.map(np.testing.assert_array_equal, after.user_params, before.user_params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  assert int(after.step) == int(before.step) + 1

  state, m = fn(state, base, shd.global_batch(_batch(c, seed=2), mesh), key)
  clean = jax.device_get(state)
  assert np.isfinite(m["loss"]) and int(m["nonfinite_streak"]) == 0
  assert int(m["skipped_updates"]) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(clean.user_params))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(clean.user_params),
                                                    jax.tree.leaves(after.user_params))]
  assert all(moved)

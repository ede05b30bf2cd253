"""The Diffusion-DPO loss against a plain numpy version of the paper's equation."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ppd_jax import dpo
from ppd_jax import step as step_lib
from ppd_jax.diffusion import schedules


def numpy_dpo_loss(eps, pred_w, ref_w, eps_l, pred_l, ref_l, beta, reduction):
  """L = -log sigmoid(-beta/2 * ((e_theta+ - e_ref+) - (e_theta- - e_ref-))), per pair."""
  red = (lambda a: a.reshape(len(a), -1).mean(1)) if reduction == "mean" else (
      lambda a: a.reshape(len(a), -1).sum(1))
  err = lambda target, pred: red((target.astype(np.float64) - pred) ** 2)
  inner = (err(eps, pred_w) - err(eps, ref_w)) - (err(eps_l, pred_l) - err(eps_l, ref_l))
  z = -0.5 * beta * inner
  return -np.log(1.0 / (1.0 + np.exp(-z))), z


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_matches_numpy_equation(reduction):
  rng = np.random.default_rng(0)
  shape = (6, 4, 4, 3)
  eps_w, eps_l = rng.normal(size=shape), rng.normal(size=shape)
  pw, rw, pl, rl = (eps_w + 0.3 * rng.normal(size=shape), eps_w + 0.3 * rng.normal(size=shape),
                    eps_l + 0.3 * rng.normal(size=shape), eps_l + 0.3 * rng.normal(size=shape))
  beta = 50.0 if reduction == "mean" else 1.0
  want, want_z = numpy_dpo_loss(eps_w, pw, rw, eps_l, pl, rl, beta, reduction)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  e = lambda t, p: dpo.squared_error(f32(t), f32(p), reduction)
  terms = dpo.dpo_terms(e(eps_w, pw), e(eps_l, pl), e(eps_w, rw), e(eps_l, rl), beta)
  np.testing.assert_allclose(terms.loss, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(terms.z, want_z, rtol=1e-4, atol=1e-5)
  assert np.ptp(want) > 0.1, "the test inputs should give pairs of different losses"


def test_sum_reduction_is_mean_with_beta_times_d():
  rng = np.random.default_rng(1)
  a, b = (jnp.asarray(rng.normal(size=(3, 8, 8, 4)), jnp.float32) for _ in range(2))
  d = 8 * 8 * 4
  np.testing.assert_allclose(dpo.squared_error(a, b, "sum"), d * dpo.squared_error(a, b, "mean"),
                             rtol=1e-5)


def test_equal_policy_and_reference_give_log2():
  err = jnp.asarray([0.3, 1.2, 0.7])
  terms = dpo.dpo_terms(err, err[::-1], err, err[::-1], beta=5000.0)
  np.testing.assert_array_equal(terms.loss, np.full(3, np.log(2.0), np.float32))


def test_large_margins_are_stable():
  terms = dpo.dpo_terms(jnp.zeros(2), jnp.asarray([1e4, -1e4]), jnp.zeros(2), jnp.zeros(2), 5000.0)
  assert np.isfinite(np.asarray(terms.loss)).all()
  np.testing.assert_allclose(terms.loss, [0.0, 0.5 * 5000.0 * 1e4], rtol=1e-6)


class _FakeModel:
  """A stand-in 'UNet' whose user branch adds scale * mean(user) * x: enough to check that the
  step's loss pairs the images, shares t and eps, and switches the branch off for the reference."""

  def apply(self, variables, x, t, text, user, scale=1.0, added_cond=None):
    base = 0.5 * x + 0.01 * t[:, None, None, None] / 1000.0 + text.mean((1, 2))[:, None, None, None]
    if user is None:
      return base
    w = variables["params"]["user_projector"]["w"]
    return base + scale * w * user.mean((1, 2))[:, None, None, None] * x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_loss_matches_numpy_end_to_end(prediction_type):
  cfg = ml_collections.ConfigDict({"loss": "dpo", "dpo": {"beta": 300.0, "reduction": "mean"}})
  sched = schedules.make_schedule(1000, "scaled_linear", 0.00085, 0.012, prediction_type)
  loss_fn = step_lib.make_loss_fn(_FakeModel(), sched, cfg)
  rng = np.random.default_rng(2)
  b, shape = 5, (4, 4, 3)
  batch = {"preferred": rng.normal(size=(b, *shape)), "dispreferred": rng.normal(size=(b, *shape)),
           "text_embedding": rng.normal(size=(b, 2, 3)),
           "user_embedding": rng.normal(size=(b, 4, 6))}
  batch = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
  t = jnp.asarray(rng.integers(0, 1000, size=b), jnp.int32)
  noise = jnp.asarray(rng.normal(size=(b, *shape)), jnp.float32)
  user_params = {"user_projector": {"w": jnp.float32(0.7)}}
  loss, metrics = loss_fn(user_params, {}, batch, t, noise)

  # numpy: same equation from scratch.
  abar = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
  np_b = {k: np.asarray(v, np.float64) for k, v in batch.items()}
  eps = np.asarray(noise, np.float64)

  def fake(x, user, scale):
    out = 0.5 * x + 0.01 * np.asarray(t)[:, None, None, None] / 1000.0 + np_b[
        "text_embedding"].mean((1, 2))[:, None, None, None]
    return out if user is None else out + scale * 0.7 * user.mean((1, 2))[:, None, None, None] * x

  preds = {}
  for name in ("preferred", "dispreferred"):
    x0 = np_b[name]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    target = eps if prediction_type == "epsilon" else np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0
    preds[name] = (target, fake(x_t, np_b["user_embedding"], 1.0), fake(x_t, None, 0.0))
  (tw, pw, rw), (tl, pl, rl) = preds["preferred"], preds["dispreferred"]
  # numpy_dpo_loss takes the target as its first argument of each triple.
  want, _ = numpy_dpo_loss(tw, pw, rw, tl, pl, rl, 300.0, "mean")
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-4)
  assert abs(float(loss) - np.log(2)) > 1e-3, "the fake user branch should move the loss"

  # The gradient flows only through the policy: d loss / d w is finite and non-zero.
  grads = jax.grad(lambda up: loss_fn(up, {}, batch, t, noise)[0])(user_params)
  assert float(grads["user_projector"]["w"]) != 0.0


def test_sft_loss_is_the_policy_error_on_preferred_images_in_numpy():
  """SFT: L = mean over pairs of mean((target - eps_theta(x_t+))^2), the diffusion loss on the
  preferred images with the user branch on, from scratch in numpy with the fake model (the
  dispreferred images, or the reference, would give other numbers: checked below)."""
  cfg = ml_collections.ConfigDict({"loss": "sft", "dpo": {"beta": 300.0, "reduction": "mean"}})
  sched = schedules.make_schedule(1000)
  loss_fn = step_lib.make_loss_fn(_FakeModel(), sched, cfg)
  rng = np.random.default_rng(3)
  b, shape = 3, (2, 2, 1)
  batch = {"preferred": rng.normal(size=(b, *shape)), "dispreferred": rng.normal(size=(b, *shape)),
           "text_embedding": rng.normal(size=(b, 2, 3)),
           "user_embedding": rng.normal(size=(b, 1, 2))}
  batch = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
  t = jnp.asarray([1, 500, 999], jnp.int32)
  noise = jnp.asarray(rng.normal(size=(b, *shape)), jnp.float32)
  loss, m = loss_fn({"user_projector": {"w": jnp.float32(0.2)}}, {}, batch, t, noise)

  abar = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
  np_b = {k: np.asarray(v, np.float64) for k, v in batch.items()}
  eps = np.asarray(noise, np.float64)

  def policy_error(x0, scale):
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    pred = (0.5 * x_t + 0.01 * np.asarray(t)[:, None, None, None] / 1000.0
            + np_b["text_embedding"].mean((1, 2))[:, None, None, None]
            + scale * 0.2 * np_b["user_embedding"].mean((1, 2))[:, None, None, None] * x_t)
    return ((eps - pred) ** 2).reshape(b, -1).mean(1).mean()

  want = policy_error(np_b["preferred"], 1.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for other in (policy_error(np_b["dispreferred"], 1.0), policy_error(np_b["preferred"], 0.0)):
    assert abs(other - want) > 1e-3 * want, "the test inputs should tell these apart"
  assert "implicit_accuracy" in m  # DPO metrics are still reported for comparison


def test_p2_weighting_scales_each_pairs_z_by_one_minus_abar_t():
  """dpo.weighting=p2: z_p2 = (1 - abar_t) z_none per pair, for the same batch, t and eps, with
  abar_t = prod_{s<=t} (1 - beta_s) from the schedule's betas in float64; loss = -log sigmoid(z)."""
  sched = schedules.make_schedule(1000, "scaled_linear", 0.00085, 0.012)
  rng = np.random.default_rng(4)
  b, shape = 5, (4, 4, 3)
  batch = {"preferred": rng.normal(size=(b, *shape)), "dispreferred": rng.normal(size=(b, *shape)),
           "text_embedding": rng.normal(size=(b, 2, 3)),
           "user_embedding": rng.normal(size=(b, 4, 6))}
  batch = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
  t = jnp.asarray([0, 150, 400, 700, 999], jnp.int32)
  noise = jnp.asarray(rng.normal(size=(b, *shape)), jnp.float32)
  user_params = {"user_projector": {"w": jnp.float32(0.7)}}

  def z_and_loss(weighting):
    cfg = ml_collections.ConfigDict({"loss": "dpo", "dpo": {"beta": 300.0, "reduction": "mean",
                                                            "weighting": weighting}})
    loss, m = step_lib.make_loss_fn(_FakeModel(), sched, cfg)(user_params, {}, batch, t, noise)
    return np.asarray(m["z"], np.float64), float(loss)

  (z_none, _), (z_p2, loss_p2) = z_and_loss("none"), z_and_loss("p2")
  abar = np.cumprod(1.0 - np.asarray(sched.betas, np.float64))[np.asarray(t)]
  np.testing.assert_allclose(z_p2, (1.0 - abar) * z_none, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss_p2, np.mean(np.logaddexp(0.0, -(1.0 - abar) * z_none)),
                             rtol=1e-5)
  assert np.abs(z_none).min() > 1e-3, "every pair should have a margin to scale"
  assert np.ptp(1.0 - abar) > 0.5, "the weights should differ between pairs"

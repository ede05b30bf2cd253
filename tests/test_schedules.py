"""Noise schedules and the forward process against diffusers' DDPMScheduler."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ppd_jax.diffusion import schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULES = [
    ("linear", 0.0001, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02),
]


def _reference(beta_schedule, beta_start, beta_end, prediction_type="epsilon"):
  return diffusers.DDPMScheduler(
      num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start,
      beta_end=beta_end, prediction_type=prediction_type)


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_tables_match_diffusers(beta_schedule, beta_start, beta_end):
  ref = _reference(beta_schedule, beta_start, beta_end)
  ours = schedules.make_schedule(1000, beta_schedule, beta_start, beta_end)
  np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
  assert ours.betas.dtype == jnp.float32 and ours.alphas_cumprod.shape == (1000,)


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(beta_schedule, beta_start, beta_end):
  ref = _reference(beta_schedule, beta_start, beta_end)
  ours = schedules.make_schedule(1000, beta_schedule, beta_start, beta_end)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((5, 4, 8, 8)).astype(np.float32)
  noise = rng.standard_normal((5, 4, 8, 8)).astype(np.float32)
  t = np.array([0, 1, 499, 998, 999])
  tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)

  np.testing.assert_allclose(
      np.asarray(schedules.add_noise(ours, x0, noise, t)),
      ref.add_noise(tx0, tnoise, tt).numpy(), atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(schedules.velocity(ours, x0, noise, t)),
      ref.get_velocity(tx0, tnoise, tt).numpy(), atol=1e-5)


def test_add_noise_broadcasts_over_any_rank():
  s = schedules.make_schedule()
  t = jnp.array([10, 900])
  for shape in [(2, 3), (2, 3, 5), (2, 4, 4, 3, 2)]:
    x0, noise = jnp.ones(shape), jnp.zeros(shape)
    out = schedules.add_noise(s, x0, noise, t)
    assert out.shape == shape
    expected = np.sqrt(np.asarray(s.alphas_cumprod)[[10, 900]])
    flat = np.asarray(out).reshape(2, -1)
    np.testing.assert_allclose(flat, np.broadcast_to(expected[:, None], flat.shape), rtol=1e-6)


def test_training_target_and_snr():
  eps_s = schedules.make_schedule(prediction_type="epsilon")
  v_s = schedules.make_schedule(prediction_type="v_prediction")
  x0, noise, t = jnp.ones((2, 3)), jnp.full((2, 3), 2.0), jnp.array([3, 700])
  np.testing.assert_array_equal(schedules.training_target(eps_s, x0, noise, t), noise)
  np.testing.assert_array_equal(
      schedules.training_target(v_s, x0, noise, t), schedules.velocity(v_s, x0, noise, t))
  abar = np.asarray(eps_s.alphas_cumprod)[[3, 700]]
  np.testing.assert_allclose(np.asarray(schedules.snr(eps_s, t)), abar / (1 - abar), rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_and_eps_inverts_add_noise(prediction_type):
  s = schedules.make_schedule(prediction_type=prediction_type)
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.standard_normal((4, 8, 8, 4)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((4, 8, 8, 4)), jnp.float32)
  t = jnp.array([0, 250, 600, 999])
  x_t = schedules.add_noise(s, x0, noise, t)
  target = schedules.training_target(s, x0, noise, t)
  x0_hat, eps_hat = schedules.predict_x0_and_eps(s, target, x_t, t)
  # x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) amplifies rounding by 1/sqrt(abar_999) ~ 15.
  np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=1e-4)
  np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(noise), atol=1e-4)


def test_unknown_names_raise_naming_the_field():
  with pytest.raises(ValueError, match="beta_schedule='cosine'"):
    schedules.make_schedule(beta_schedule="cosine")
  with pytest.raises(ValueError, match="prediction_type='sample'"):
    schedules.make_schedule(prediction_type="sample")


def test_schedule_from_config():
  cfg = ml_collections.ConfigDict(dict(
      num_train_timesteps=500, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2,
      prediction_type="v_prediction"))
  s = schedules.schedule_from_config(cfg)
  assert s.num_train_timesteps == 500 and s.prediction_type == "v_prediction"
  np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [1e-4, 2e-2], rtol=1e-6)

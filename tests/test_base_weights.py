"""Base weights written by the project's scripts load back exactly; foreign files are refused."""
import jax
import numpy as np
import pytest

from configs import ppd
from ppd_jax import config_validation
from ppd_jax import sharding as shd
from ppd_jax import state as state_lib
from ppd_jax import step as step_lib
from ppd_jax.models import base_weights, build_model, init_params, split_params


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
  c = ppd.get_config("tiny")
  model = build_model(c.model)
  base, _ = split_params(init_params(model, jax.random.key(42)))
  path = str(tmp_path_factory.mktemp("base") / "base.npz")
  base_weights.save(path, jax.device_get(base), c.model, steps=7)
  return c, model, jax.device_get(base), path


def test_saved_base_loads_exactly_into_the_sharded_state(tiny_base):
  c, model, base, path = tiny_base
  mesh = shd.make_mesh(-1, 1)
  tx, _ = step_lib.make_optimizer(c)
  state, loaded, _, base_sh = state_lib.create_train_state(model, tx, mesh, c.seed, path)
  random_state, _, _, _ = state_lib.create_train_state(model, tx, mesh, c.seed, "random")
  # The user branch's init does not depend on where the base came from.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.user_params),
               jax.device_get(random_state.user_params))
  flat_a = jax.tree.leaves(jax.device_get(loaded))
  flat_b = jax.tree.leaves(base)
  assert len(flat_a) == len(flat_b)
  for a, b in zip(flat_a, flat_b):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.leaves(loaded)[0].sharding == jax.tree.leaves(base_sh)[0]
  np.testing.assert_array_equal(
      jax.tree.leaves(state_lib.initial_base_params(model, c.seed, path))[0], flat_b[0])
  assert base_weights.read_meta(path)["steps"] == 7


def test_architecture_mismatch_is_a_config_error_naming_the_field(tiny_base):
  c, _, _, path = tiny_base
  c = ppd.get_config("tiny")
  c.model.base = path
  config_validation.validate(c)
  c.model.block_out_channels = (16, 48)
  with pytest.raises(config_validation.ConfigError, match="model.block_out_channels"):
    config_validation.validate(c)
  with pytest.raises(base_weights.BaseWeightsError, match="block_out_channels"):
    base_weights.load(path, c.model)


def test_missing_or_unknown_base_is_rejected(tmp_path):
  c = ppd.get_config("tiny")
  c.model.base = str(tmp_path / "nowhere.npz")
  with pytest.raises(config_validation.ConfigError, match="model.base"):
    config_validation.validate(c)
  c.model.base = "sd15"
  with pytest.raises(config_validation.ConfigError, match="model.base"):
    config_validation.validate(c)


def test_packaged_demo_base_matches_the_demo_config():
  c = ppd.get_config("demo")
  config_validation.validate(c)
  meta = base_weights.read_meta(base_weights.resolve("demo"))
  assert meta["architecture"] == base_weights.architecture(c.model)
  assert meta["text_encoder_seed"] > 0 and meta["steps"] > 0

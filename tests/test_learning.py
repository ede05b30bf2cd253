"""A few dozen DPO steps on the demo config teach the user branch the training users' taste."""
import jax
import numpy as np

from configs import ppd
from ppd_jax import sharding as shd
from ppd_jax import state as state_lib
from ppd_jax import step as step_lib
from ppd_jax import trainer
from ppd_jax.data import sources
from ppd_jax.diffusion import schedules
from ppd_jax.evals import implicit_reward
from ppd_jax.models import build_model


def test_demo_steps_raise_implicit_accuracy_on_training_users(tmp_path):
  c = ppd.get_config("demo")
  c.total_steps = 40
  c.checkpoint_every = 40
  state = jax.device_get(trainer.train_and_evaluate(c, str(tmp_path)))

  model = build_model(c.model)
  tx, _ = step_lib.make_optimizer(c)
  mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
  _, base, _, _ = state_lib.create_train_state(model, tx, mesh, c.seed)
  source = sources.build_source(c)
  # 256 training pairs spread over all training users, 4 noise draws each.
  pairs = source.gather(np.arange(0, len(source), max(1, len(source) // 256))[:256])
  schedule = schedules.schedule_from_config(c.diffusion)
  trained = implicit_reward.evaluate_pairs(model, schedule, c, base, state.user_params, pairs)
  untrained = implicit_reward.evaluate_pairs(model, schedule, c, base,
                                             jax.tree.map(lambda x: x * 0, state.user_params),
                                             pairs)
  assert untrained["loss"] > 0.69  # user branch off: the loss is log 2
  assert trained["implicit_accuracy"] > 0.55, trained
  assert trained["loss"] < untrained["loss"], trained

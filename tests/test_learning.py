"""A few dozen DPO steps on the demo config teach the user branch the training users' taste."""
import jax
import numpy as np

from configs import ppd
from ppd_jax import inference
from ppd_jax import trainer
from ppd_jax.evals import implicit_reward
from ppd_jax.models import split_params


def test_demo_steps_raise_implicit_accuracy_on_training_users(tmp_path):
  c = ppd.get_config("demo")
  c.total_steps = 60
  c.checkpoint_every = 60
  trainer.train_and_evaluate(c, str(tmp_path))

  run = inference.load_trained(str(tmp_path))
  base, user = split_params(jax.device_get(run.params))
  # 256 training pairs spread over all training users, 4 noise draws each.
  pairs = run.source.gather(np.arange(0, len(run.source), max(1, len(run.source) // 256))[:256])
  evaluate = lambda user_params: implicit_reward.evaluate_pairs(
      run.model, run.schedule, run.config, base, user_params, pairs)
  trained = evaluate(user)
  untrained = evaluate(jax.tree.map(lambda x: x * 0, user))
  assert untrained["loss"] > 0.69  # user branch off: the loss is log 2
  assert trained["implicit_accuracy"] > 0.55, trained
  assert trained["loss"] < untrained["loss"], trained

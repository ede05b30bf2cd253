"""The script that made the packaged demo base still runs and writes a loadable, better base."""
import jax
import numpy as np

from configs import ppd
from ppd_jax.demo import pretrain_base
from ppd_jax.models import base_weights, build_model, init_params, split_params


def test_a_few_pretraining_steps_write_a_base_the_demo_config_loads(tmp_path):
  out = str(tmp_path / "base.npz")
  meta = pretrain_base.pretrain(steps=6, batch_size=8, lr=1e-3, ema_decay=0.5, seed=3, out=out,
                                log_every=3)
  c = ppd.get_config("demo")
  model = build_model(c.model)
  shapes = split_params(jax.eval_shape(lambda: init_params(model, jax.random.key(0))))[0]
  params, saved = base_weights.load(out, c.model, shapes)
  assert saved["steps"] == meta["steps"] == 6 and np.isfinite(saved["final_loss"])
  init = split_params(init_params(model, jax.random.key(3)))[0]
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init))]
  assert all(moved), "every base parameter is trained (the EMA moved it from its init)"

"""Validation while training: the DPO loss and implicit accuracy on fixed held-out pairs.

Every `eval_every` steps the trainer scores the same `eval.val_pairs` pairs of validation users
(Pick-a-Pic's validation split; the synthetic source's unseen users), never trained on, with the
same timestep and noise for each pair at every evaluation, so the curve moves only because the
user branch does:

    z_i  = -beta/2 [ (e_theta(x0+_i) - e_ref(x0+_i)) - (e_theta(x0-_i) - e_ref(x0-_i)) ]
    val/loss              = mean_i softplus(-z_i)              (= -log sigmoid(z_i))
    val/implicit_accuracy = mean_i (1[z_i > 0] + 0.5 * 1[z_i = 0])
    val/reward_margin     = mean_i z_i

Each process holds only its own rows of each validation batch, as the training loader does.
"""
import jax
import numpy as np

from ppd_jax import sharding as shd
from ppd_jax import step as step_lib


def _batch_size(config, devices: int, available: int) -> int:
  """eval.val_batch_size (0: the training micro-batch), at most the held-out pairs there are,
  a multiple of the devices (each holds its rows)."""
  size = min(config.eval.val_batch_size or config.batch_size // config.grad_accum_steps,
             config.eval.val_pairs, available)
  return size // devices * devices


def aggregate(z: np.ndarray) -> dict:
  """The val/* metrics from the per-pair margins (module docstring), in float64."""
  z = np.asarray(z, np.float64)
  return {"val/loss": float(np.logaddexp(0.0, -z).mean()),
          "val/implicit_accuracy": float(((z > 0) + 0.5 * (z == 0)).mean()),
          "val/reward_margin": float(z.mean()), "val/pairs": float(len(z))}


class Validator:
  """Fixed held-out batches and a jitted per-pair margin; `__call__(state, base) -> metrics`."""

  def __init__(self, config, model, schedule, mesh, state_shardings, base_shardings,
               held_out, log=print):
    """held_out: a PairSource (data/pipeline.py) of validation users' pairs."""
    self.mesh = mesh
    size = _batch_size(config, mesh.devices.size, len(held_out))
    if size == 0:
      from ppd_jax.config_validation import ConfigError
      raise ConfigError(f"validation needs at least {mesh.devices.size} held-out pairs (one per "
                       f"device), the source has {len(held_out)}; config.eval_every=0 turns validation off")
    n = min(config.eval.val_pairs, len(held_out)) // size * size
    order = np.random.default_rng(config.eval.seed).permutation(len(held_out))[:n]
    local = size // jax.process_count()
    start = jax.process_index() * local
    keys = step_lib.batch_keys(config.model)
    self._batches = []
    for i in range(0, n, size):
      rows = np.sort(order[i:i + size])[start:start + local]
      self._batches.append({k: v for k, v in held_out.gather(rows).items() if k in keys})
    log(f"validation: {n} held-out pairs in {len(self._batches)} batches of {size}")
    self._key = jax.random.key(config.eval.seed)
    loss_fn = step_lib.make_loss_fn(model, schedule, config)

    def margins(user_params, base_params, batch, index):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        t, noise = step_lib.draw_t_and_noise(jax.random.fold_in(self._key, index), batch,
                                             schedule)
        return loss_fn(user_params, base_params, batch, t, noise)[1]["z"]

    self._margins = jax.jit(
        margins, in_shardings=(state_shardings.user_params, base_shardings,
                               shd.batch_sharding(mesh), shd.replicated(mesh)),
        out_shardings=shd.replicated(mesh))

  def __call__(self, state, base_params) -> dict:
    z = [self._margins(state.user_params, base_params, shd.global_batch(b, self.mesh), i)
         for i, b in enumerate(self._batches)]
    return aggregate(np.concatenate(jax.device_get(z)))

"""The flat PPD training loop: mesh, data, state, step, metrics, checkpoints.

Resuming is automatic: if W/checkpoints holds a checkpoint made for the same model and data, the
run continues from it (params, optimizer, step and data position), and gives the same params and
metrics as a run that was never stopped.
"""
import os

import jax
import ml_collections

from ppd_jax import checkpoint as ckpt_lib
from ppd_jax import config_validation
from ppd_jax import distributed
from ppd_jax import metrics as metrics_lib
from ppd_jax import sharding as shd
from ppd_jax import state as state_lib
from ppd_jax import step as step_lib
from ppd_jax.data import pipeline
from ppd_jax.data import sources
from ppd_jax.diffusion import schedules
from ppd_jax.models import build_model


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Trains the user branch for config.total_steps steps; returns the final TrainState."""
  config_validation.prepare(config)
  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(os.path.abspath(workdir), "checkpoints"), keep=config.keep_checkpoints,
      async_save=config.async_checkpointing)
  resume_step = checkpointer.latest_step()
  if resume_step is not None:
    checkpointer.check_compatible(config)  # before any expensive work

  mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
  model = build_model(config.model)
  schedule = schedules.schedule_from_config(config.diffusion)
  tx, lr_schedule = step_lib.make_optimizer(config)

  source = sources.build_source(config)
  dataset = pipeline.make_dataset(
      source, config.batch_size, config.seed, jax.process_index(), jax.process_count(),
      config.data.worker_count)
  data_iter = iter(dataset)

  state, base_params, state_sh, base_sh = state_lib.create_train_state(
      model, tx, mesh, config.seed, config.model.base, config.model.pretrained,
      config.model.variant)
  if resume_step is not None:
    state = checkpointer.restore(ckpt_lib.abstract_like(state, state_sh), data_iter)
  start = int(jax.device_get(state.step))

  train_step = step_lib.make_train_step(
      model, schedule, config, tx, lr_schedule, mesh, state_sh, base_sh)
  step_key = jax.random.fold_in(jax.random.key(config.seed), 1)

  _write_run_info(workdir, config, mesh, base_params, state.user_params)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
  progress = metrics_lib.Progress(config.total_steps, config.batch_size, start)
  metrics_lib.log(f"{'resuming at' if start else 'starting'} step {start} of "
                  f"{config.total_steps}; mesh {dict(mesh.shape)}; workdir {workdir}")

  compiled = None
  batch_keys = step_lib.batch_keys(config.model)
  for step in range(start, config.total_steps):
    local = next(data_iter)
    batch = shd.global_batch({k: local[k] for k in batch_keys}, mesh)
    if compiled is None:
      compiled = train_step.lower(state, base_params, batch, step_key).compile()
      distributed.barrier("ppd_jax/train_step_compiled")
    state, metrics = compiled(state, base_params, batch, step_key)
    done = step + 1
    if done % config.log_every == 0 or done == config.total_steps:
      metrics = jax.device_get(metrics)
      speed = progress.update(done)
      writer.write(done, {**metrics, **speed})
      metrics_lib.log(progress.format(done, metrics, speed))
    if done % config.checkpoint_every == 0 or done == config.total_steps:
      checkpointer.save(done, state, data_iter, config)

  checkpointer.wait()
  checkpointer.close()
  writer.close()
  return state


def _write_run_info(workdir, config, mesh, base_params, user_params) -> None:
  """W/config.json and parameter counts, for a person reading the run folder."""
  if jax.process_index() != 0:
    return
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  metrics_lib.log(f"params: frozen base {count(base_params):,}, trainable user branch "
                  f"{count(user_params):,}; devices {mesh.devices.size}, "
                  f"processes {jax.process_count()}")

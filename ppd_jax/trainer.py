"""The flat PPD training loop: mesh, data, state, step, validation, metrics, checkpoints.

Resuming is automatic: if W/checkpoints holds a checkpoint made with the same settings, the run
continues from it (params, optimizer, step and data position), and gives the same params and
metrics as a run that was never stopped. A changed setting that resuming cannot honour is refused
(checkpoint.py) unless `allow_changed` names it. SIGTERM saves the current step and returns
(preemption.py). A non-finite step is skipped by the step itself; `optim.max_nonfinite_steps` of
them in a row stop the run with NonFiniteError, and the checkpoints on disk stay finite.
"""
import collections
import time

import jax
import ml_collections
import numpy as np

from ppd_jax import batch_plan
from ppd_jax import checkpoint as ckpt_lib
from ppd_jax import config_validation
from ppd_jax import distributed
from ppd_jax import metrics as metrics_lib
from ppd_jax import preemption
from ppd_jax import run_users
from ppd_jax import sharding as shd
from ppd_jax import state as state_lib
from ppd_jax import step as step_lib
from ppd_jax import storage
from ppd_jax import throughput as throughput_lib
from ppd_jax import validation
from ppd_jax.data import pipeline
from ppd_jax import sources
from ppd_jax.diffusion import schedules
from ppd_jax.models import build_model

_ID_KEYS = ("pair", "user_id")   # what a skipped batch is reported by


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row; the message names the steps, pairs and users."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir,
                       allow_changed=()) -> step_lib.TrainState | None:
  """Trains the user branch for config.total_steps steps; returns the final TrainState, or None
  when the latest checkpoint is already at total_steps (or past it): nothing is built or run.

  allow_changed: config fields (or sections) a resumed run may change, e.g. ("optim.lr",).
  """
  config_validation.prepare(config)
  # The device count is known now (distributed.maybe_initialize ran): refuse a batch that does
  # not divide before model init, data or compile.
  split = batch_plan.resolve(config, jax.device_count())
  workdir = storage.check_writable(workdir)   # a URL stays one; a bad bucket fails here, at once
  checkpointer = ckpt_lib.Checkpointer(
      workdir / "checkpoints", keep=config.keep_checkpoints,
      async_save=config.async_checkpointing)
  resume_step = checkpointer.latest_step()
  if resume_step is not None:   # before any expensive work
    for change in checkpointer.check_compatible(config, allow_changed=allow_changed):
      metrics_lib.log(f"resuming with a changed setting (allowed): {change}")
    if resume_step >= config.total_steps:   # a rerun of a finished run: no model, no compile
      metrics_lib.log(f"finished at step {resume_step} (total_steps {config.total_steps}); "
                      f"nothing to do; raise --config.total_steps above {resume_step} to "
                      "continue")
      checkpointer.close()
      return None

  mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
  model = build_model(config.model)
  schedule = schedules.schedule_from_config(config.diffusion)
  tx, lr_schedule = step_lib.make_optimizer(config)

  source = sources.build_source(config)
  data_iter = pipeline.Batches(
      source, config.batch_size, config.seed, jax.process_index(), jax.process_count(),
      config.data.worker_count)

  state, base_params, state_sh, base_sh = state_lib.create_train_state(
      model, tx, mesh, config.seed, config.model.base, config.model.pretrained,
      config.model.variant, prior_subfolder=config.model.get("prior_subfolder", "prior_lite"))
  if resume_step is not None:
    state = checkpointer.restore(ckpt_lib.abstract_like(state, state_sh), data_iter,
                                 config=config)
  start = int(jax.device_get(state.step))

  train_step = step_lib.make_train_step(
      model, schedule, config, tx, lr_schedule, mesh, state_sh, base_sh)
  step_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  validator = None
  if config.eval_every:
    held_out = sources.build_held_out(config, source)
    if len(held_out):
      validator = validation.Validator(config, model, schedule, mesh, state_sh, base_sh,
                                       held_out, metrics_lib.log)
    else:   # e.g. smoke data too small to give the validation split a user
      metrics_lib.log("warning: no held-out pairs of validation users; validation is off")

  _write_run_info(workdir, config, mesh, base_params, state.user_params)
  if jax.process_index() == 0:   # the users sampling needs, kept beside checkpoints/
    run_users.save(workdir, source, config)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
  metrics_lib.log(f"{'resuming at' if start else 'starting'} step {start} of "
                  f"{config.total_steps}; mesh {dict(mesh.shape)}; {split}; workdir {workdir}")

  batch_keys = step_lib.batch_keys(config.model)
  finite = jax.jit(lambda s: step_lib.all_finite((s.user_params, s.opt_state)))
  recent = collections.deque(maxlen=config.optim.max_nonfinite_steps)
  compiled, progress, pending = None, None, []

  def check_pending() -> None:
    while pending:
      check(*pending.pop(0))

  def save(done: int, force: bool = False) -> None:
    t0 = time.perf_counter()
    # Never reached by construction (the step keeps the old state); a last line of defence.
    if not bool(finite(state)):
      raise NonFiniteError(f"step {done}: the train state is not finite; not saving it")
    checkpointer.save(done, state, data_iter, config, force=force)
    if progress is not None:
      progress.pause(time.perf_counter() - t0)

  def check(done: int, metrics, ids: dict) -> None:
    """Reports a skipped step, and stops after too many in a row (one step behind dispatch)."""
    streak = int(jax.device_get(metrics["nonfinite_streak"]))
    if not streak:
      recent.clear()
      return
    recent.append((done, ids))
    metrics_lib.log(f"warning: step {done}: non-finite loss or gradient; update skipped "
                    f"({streak} in a row). {_describe([ids])}")
    if streak >= config.optim.max_nonfinite_steps:
      checkpointer.wait()
      last = checkpointer.latest_step()
      raise NonFiniteError(
          f"steps {recent[0][0]}..{done}: {streak} non-finite steps in a row "
          f"(config.optim.max_nonfinite_steps={config.optim.max_nonfinite_steps}); no update of "
          f"theirs was applied. {_describe([i for _, i in recent])} The latest checkpoint, step "
          f"{last}, is finite. Look for non-finite user embeddings or inputs of those pairs, or "
          "lower dpo.beta / optim.lr.")

  with preemption.StopRequest() as stop:
    for step in range(start, config.total_steps):
      local = next(data_iter)
      batch = shd.global_batch({k: local[k] for k in batch_keys}, mesh)
      ids = {k: np.asarray(local[k]) for k in _ID_KEYS if k in local}
      if compiled is None:
        compiled = train_step.lower(state, base_params, batch, step_key).compile()
        distributed.barrier("ppd_jax/train_step_compiled")
        progress = metrics_lib.Progress(config.total_steps, config.batch_size, start,
                                        _throughput(config, batch, mesh))
      state, metrics = compiled(state, base_params, batch, step_key)
      done = step + 1
      check_pending()           # the previous step's, now that this one is queued
      pending.append((done, metrics, ids))
      if done % config.log_every == 0 or done == config.total_steps:
        check_pending()
        metrics = jax.device_get(metrics)
        speed = progress.update(done)
        writer.write(done, {**metrics, **speed})
        metrics_lib.log(progress.format(done, metrics, speed))
      if validator is not None and (done % config.eval_every == 0 or done == config.total_steps):
        t0 = time.perf_counter()
        val = validator(state, base_params)
        progress.pause(time.perf_counter() - t0)
        writer.write(done, val)
        metrics_lib.log(f"step {done}: validation loss {val['val/loss']:.4f}, implicit_acc "
                        f"{val['val/implicit_accuracy']:.3f} on {int(val['val/pairs'])} pairs")
      stopping = stop.requested(done)
      if done % config.checkpoint_every == 0 or done == config.total_steps or stopping:
        check_pending()
        save(done, force=stopping)
      if stopping:
        metrics_lib.log(f"stopping at step {done} ({stop.received or 'preemption'}): "
                        "checkpoint saved; run the same command to resume")
        break
    check_pending()

  checkpointer.wait()
  checkpointer.close()
  data_iter.close()
  writer.close()
  return state


def _describe(batches: list[dict]) -> str:
  """The ids of this process's rows of some batches, for a message."""
  parts = []
  for key in _ID_KEYS:
    values = np.unique(np.concatenate([b[key] for b in batches if key in b] or [np.zeros(0)]))
    if values.size:
      shown = ", ".join(str(int(v)) for v in values[:16]) + (" ..." if values.size > 16 else "")
      parts.append(f"{key}s [{shown}]")
  return ("Their batches (this process's rows) hold " + "; ".join(parts) + ".") if parts else ""


def _throughput(config, batch: dict, mesh) -> throughput_lib.Throughput:
  """TFLOP/s and MFU of the step; a count that fails costs those figures, never the run."""
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  try:
    flops = throughput_lib.count_step_flops(config, shapes)
  except Exception as e:  # noqa: BLE001 -- the count is a report, not part of training
    flops = None
    metrics_lib.log(f"warning: FLOPs not counted ({type(e).__name__}: {e}): TFLOP/s and MFU "
                    "are left out")
  return throughput_lib.Throughput(flops, mesh.devices.size, jax.devices()[0].device_kind)


def _write_run_info(workdir, config, mesh, base_params, user_params) -> None:
  """W/config.json and parameter counts, for a person reading the run folder."""
  if jax.process_index() != 0:
    return
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  storage.write_text(storage.makedirs(workdir) / "config.json", config.to_json(indent=2))
  metrics_lib.log(f"params: frozen base {count(base_params):,}, trainable user branch "
                  f"{count(user_params):,}; devices {mesh.devices.size}, "
                  f"processes {jax.process_count()}")

"""Orbax checkpoints of a PPD run: what is saved, how a run resumes, and how a bad one is reported.

A checkpoint at step s is the folder W/checkpoints/s with three items:
  state   TrainState: step, user-branch params, optimizer state (never the frozen base, which is
          re-made or re-loaded from its source)
  data    the Grain iterator's position, one file per process
  config  the run's configuration as JSON
Orbax writes into a temporary folder and renames it when complete, so a crash or kill during a
save leaves the previous checkpoint intact and the half-written one is never taken as a step.
"""
import json
import logging
from typing import Sequence

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

# Config sections that must match for a checkpoint's params and data position to make sense:
# what the params are (model, data, diffusion), where the data iterator is and what it yields
# (batch_size, grad_accum_steps, seed: its position counts batches of one size in one shuffle),
# and what the optimizer state means (loss, dpo, optim). A rerun may change them on purpose
# (e.g. a lower learning rate) only when told to (`allow_changed`).
_MUST_MATCH = ("model", "data", "diffusion", "batch_size", "grad_accum_steps", "seed", "loss",
               "dpo", "optim")
# ...except these, which change how the run goes but not what it computes.
_MAY_DIFFER = ("data.worker_count", "data.precompute_batch", "model.attention_impl",
               "model.remat", "optim.max_nonfinite_steps")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into this run; the message says which and why."""


def _jsonable(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def _mismatches(saved: dict, current: dict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if f"{prefix}{key}" in _MAY_DIFFER:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      out += _mismatches(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: checkpoint {a!r} != config {b!r}")
  return out


class Checkpointer:
  """Saves and restores (TrainState, data iterator, config) under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict,
           force: bool = False) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(_jsonable(config)))
    return self._manager.save(step, args=args, force=force)

  def _step_or_latest(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint under {self.directory}")
    if step not in self._manager.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} under {self.directory}; "
                            f"available: {sorted(self._manager.all_steps())}")
    return step

  def restore_config(self, step: int | None = None) -> dict:
    step = self._step_or_latest(step)
    try:
      return self._manager.restore(
          step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} is unreadable ({type(e).__name__}: {e}); "
          "delete that folder to resume from the one before it") from e

  def check_compatible(self, config: ml_collections.ConfigDict, step: int | None = None,
                       allow_changed: Sequence[str] = ()) -> list[str]:
    """Raises CheckpointError if the checkpoint was made with other settings than `config` in
    the sections above, unless each changed field is allowed: `allow_changed` names fields or
    sections ("optim.lr", "optim"). Returns the allowed changes, for the log."""
    saved, current = self.restore_config(step), _jsonable(config)
    problems = []
    for section in _MUST_MATCH:
      problems += _mismatches({section: saved.get(section, "<absent>")},
                              {section: current.get(section, "<absent>")})
    allowed = [p for p in problems if _is_allowed(p.split(":")[0], allow_changed)]
    refused = [p for p in problems if p not in allowed]
    if refused:
      names = ",".join(p.split(":")[0] for p in refused)
      raise CheckpointError(
          f"checkpoint under {self.directory} was made with other settings:\n  "
          + "\n  ".join(refused) + "\nResuming would not continue that run (the data position, "
          "the optimizer state or the params would mean something else). Use another --workdir, "
          f"the checkpoint's settings, or accept the change on purpose with "
          f"--allow_changed={names}")
    return allowed

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """Restores the TrainState onto the shardings of `abstract_state` (and the iterator)."""
    step = self._step_or_latest(step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} cannot be restored into this run "
          f"({type(e).__name__}: {e}). If it is corrupt, delete that folder to resume from the "
          "one before it; if the model changed, use another --workdir.") from e
    logging.info("restored checkpoint at step %d from %s", step, self.directory)
    return restored.state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _is_allowed(field: str, allow_changed: Sequence[str]) -> bool:
  return any(field == a or field.startswith(a + ".") for a in allow_changed)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying shardings: Orbax's restore target."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

"""Orbax checkpoints of a PPD run: what is saved, how a run resumes, and how a bad one is reported.

A checkpoint at step s is the folder W/checkpoints/s with three items:
  state   TrainState: step, user-branch params, optimizer state (never the frozen base, which is
          re-made or re-loaded from its source)
  data    the data position {"next_batch": n}: global batches taken (data/pipeline.py), which
          does not depend on data.worker_count. Checkpoints of older versions hold Grain's
          iterator state instead (data/process_I-of-P.json); the position is read from it.
  config  the run's configuration as JSON
Orbax writes into a temporary folder and renames it when complete, so a crash or kill during a
save leaves the previous checkpoint intact and the half-written one is never taken as a step.
"""
import json
import logging
import weakref
from typing import Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp

from ppd_jax import storage
from ppd_jax.data import pipeline

# Config sections that must match for a checkpoint's params and data position to make sense:
# what the params are (model, data, diffusion), where the data iterator is and what it yields
# (batch_size, seed: its position counts global batches of one size in one shuffle),
# and what the optimizer state means (loss, dpo, optim). A rerun may change them on purpose
# (e.g. a lower learning rate) only when told to (`allow_changed`).
_MUST_MATCH = ("model", "data", "diffusion", "batch_size", "seed", "loss", "dpo", "optim")
# ...except these, which change how the run goes but not what it computes. grad_accum_steps (and
# per_device_batch, from which it follows per device count) only splits the same global batch:
# a step is the gradient of the mean over it either way, so a resume on other devices may change it.
_MAY_DIFFER = ("data.worker_count", "data.precompute_batch", "model.attention_impl",
               "model.remat", "optim.max_nonfinite_steps", "grad_accum_steps", "per_device_batch")


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
    self.directory = storage.path(directory)   # a URL as it is, a local path made absolute
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config"))
    # Closed once: by close(), or at exit when an error left the run before close() (its async
    # threads otherwise outlive the event loop and print tracebacks at exit).
    self._closer = weakref.finalize(self, self._manager.close)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict,
           force: bool = False) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_iterator.get_state()),
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
          f"checkpoint {self.directory / str(step)} is unreadable ({type(e).__name__}: {e}). "
          + _fall_back(self.directory, step)) from e

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

  def restore(self, abstract_state, data_iterator=None, step: int | None = None,
              config: ml_collections.ConfigDict | None = None):
    """Restores the TrainState onto the shardings of `abstract_state`, and moves `data_iterator`
    (a pipeline.Batches) to the saved position. `config`, the run's, names in an error which
    setting differs from the checkpoint's."""
    step = self._step_or_latest(step)
    # Before any read: a restore that fails on a shape leaves Orbax's reads in flight, which
    # print hundreds of "Event loop is closed" tracebacks at exit.
    self._check_shapes(step, abstract_state, config)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # a damaged file, or params whose shapes the code no longer makes
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} cannot be restored into this run "
          f"({type(e).__name__}: {e}). If the model or code changed, use another --workdir. "
          + _fall_back(self.directory, step)) from e
    if data_iterator is not None:
      self._restore_position(step, data_iterator, config)
    logging.info("restored checkpoint at step %d from %s", step, self.directory)
    return restored.state

  def _check_shapes(self, step: int, abstract_state, config) -> None:
    """Refuses params whose saved shapes differ from this run's, naming the config fields that
    changed: a field that decides the trained params' shapes (model.user_embed_dim,
    model.user_tokens, the architecture) cannot change on resume, even with --allow_changed."""
    try:
      with ocp.StandardCheckpointer() as reader:
        saved = reader.metadata(self.directory / str(step) / "state")
      saved = _shapes(getattr(getattr(saved, "item_metadata", saved), "tree", saved))
    except Exception:  # noqa: BLE001 - unreadable metadata: restore() reports the checkpoint
      return
    if not any(saved.values()):   # damaged metadata reads as no arrays: restore() reports it
      return
    wanted = _shapes(abstract_state)
    wrong = [f"{k}: saved {saved.get(k, 'absent')}, this run {wanted.get(k, 'absent')}"
             for k in sorted(set(saved) | set(wanted), key=lambda k: (k.startswith("opt"), k))
             if saved.get(k) != wanted.get(k)]
    if not wrong:
      return
    fields = []
    if config is not None:
      try:
        fields = [p.split(":")[0] for p in _mismatches(
            {"model": self.restore_config(step).get("model", {})},
            {"model": _jsonable(config).get("model", {})})]
      except CheckpointError:
        pass
    changed = f" ({', '.join(fields)} changed)" if fields else ""
    raise CheckpointError(
        f"checkpoint {self.directory / str(step)} holds trained params of other shapes than "
        f"this run's model{changed}: {'; '.join(wrong[:3])}"
        + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "") + ". A field that decides "
        "their shapes cannot change on resume, even with --allow_changed: use another --workdir "
        "or the checkpoint's settings.")

  def _restore_position(self, step: int, data_iterator, config) -> None:
    """Sets {"next_batch": n} of checkpoint `step`, also read from older versions' Grain state."""
    folder = self.directory / str(step) / "data"
    grain_files = sorted(folder.glob("process_*-of-*.json")) if folder.exists() else []
    try:
      if grain_files:   # every process took the same number of global batches: any file will do
        position = {"next_batch": pipeline.position_from_grain_state(
            json.loads(grain_files[0].read_text()))}
      else:
        position = self._manager.restore(
            step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
      data_iterator.set_state(position)
    except Exception as e:
      raise CheckpointError(self._data_error(step, folder, config, e)) from e

  def _data_error(self, step: int, folder, config, error: Exception) -> str:
    """Says that the params are intact (never to delete anything) and which data setting differs."""
    try:
      saved = self.restore_config(step).get("data", {})
    except CheckpointError:
      saved = {}
    current = _jsonable(config).get("data", {}) if config is not None else {}
    changed = [k for k in sorted(saved) if k in current and saved[k] != current[k]]
    if changed:
      advice = ("It was saved with " + ", ".join(
          f"data.{k}={saved[k]!r} (this run: {current[k]!r})" for k in changed)
                + ": to resume, run with " + " ".join(f"--config.data.{k}={saved[k]}"
                                                      for k in changed) + ". ")
    else:
      advice = "Resume with the data settings it was saved with. "
    return (f"the data position of checkpoint {self.directory / str(step)} cannot be read from "
            f"{folder} ({type(error).__name__}: {error}). Its params and optimizer state are not "
            f"affected: keep the checkpoint. {advice}If that does not help, report this error "
            "with the files of that data folder.")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._closer()


def _fall_back(directory, step: int) -> str:
  """How to resume from the step before a damaged one without destroying anything."""
  return (f"If only that step's files are damaged (e.g. a full disk during the save), move "
          f"{directory / str(step)} out of {directory} (keep it) and run again: the run resumes "
          "from the checkpoint before it.")


def _shapes(tree) -> dict[str, tuple]:
  """{"user_params/unet/.../kernel": shape} of a state or its saved metadata (dict keys,
  attribute names and list indices alike, so the two trees' paths compare)."""
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _is_allowed(field: str, allow_changed: Sequence[str]) -> bool:
  return any(field == a or field.startswith(a + ".") for a in allow_changed)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying shardings: Orbax's restore target."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

"""Stopping on SIGTERM (SLURM, a TPU or cloud preemption) at a step every process agrees on.

The trainer asks `requested(step)` once per step; when it says yes it saves that step and returns,
so a requeued job resumes from there. One process: a SIGTERM handler sets a flag. Several
processes: a signal reaches them at different steps, so they must agree on one; JAX's preemption
sync manager (set up by jax.distributed.initialize, which also listens for SIGTERM) computes the
step, and our own handler is not installed so as not to replace its.
"""
import signal

import jax


class StopRequest:
  """Context manager: `with StopRequest() as stop: ... if stop.requested(step): save, return`."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self.signals = tuple(signals)
    self.received = None
    self._previous = {}

  def __enter__(self) -> "StopRequest":
    if jax.process_count() == 1:
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signal.Signals(signum).name

  def requested(self, step: int) -> bool:
    """True at the step where every process should save and stop."""
    if jax.process_count() == 1:
      return self.received is not None
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption sync manager (a launch without jax.distributed)
      return False

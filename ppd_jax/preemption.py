"""Stopping on SIGTERM (SLURM, a TPU or cloud preemption) or Ctrl-C at a step every process
agrees on.

The trainer asks `requested(step)` once per step; when it says yes it saves that step and returns,
so a rerun (or a requeued job) resumes from there. One process: a handler sets a flag. Several
processes: a signal reaches them at different steps, so they must agree on one; JAX's preemption
sync manager (set up by jax.distributed.initialize, which also listens for SIGTERM) computes the
step, and our own SIGTERM handler is not installed so as not to replace its; a Ctrl-C is passed on
to it as a SIGTERM to this process.

Ctrl-C: the first one says that the run stops after this step; a second one quits at once (exit
130, no traceback), losing only the steps since the last checkpoint, which stays intact (Orbax
writes into a temporary folder and renames it when complete). Python runs signal handlers only
between bytecodes of the main thread, which may sit in a compile or a device wait for minutes, so
the Ctrl-Cs are read by a thread from the signal module's wakeup fd, which the C-level handler
writes at once.
"""
import os
import signal
import socket
import sys
import threading

import jax

QUIT_STATUS = 130   # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


class StopRequest:
  """Context manager: `with StopRequest() as stop: ... if stop.requested(step): save, return`."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self.received = None
    self._previous = {}
    self._interrupts = 0
    self._wakeup = None   # (reading socket, the wakeup fd that was set before)

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is not threading.main_thread():
      return self   # signal handlers can only be set from the main thread
    for sig in self.signals:
      if sig == signal.SIGINT:
        self._previous[sig] = signal.signal(sig, _noop)   # the watcher thread acts on it
        self._watch_interrupts()
      elif jax.process_count() == 1:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    if self._wakeup is not None:
      reader, before = self._wakeup
      signal.set_wakeup_fd(before)
      reader.close()   # ends the watcher thread
      self._wakeup = None

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signal.Signals(signum).name

  def _watch_interrupts(self) -> None:
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    before = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    self._wakeup = (reader, before)

    def watch():
      with writer:
        while True:
          try:
            data = reader.recv(64)
          except OSError:
            return
          if not data:
            return
          for signum in data:
            if signum == signal.SIGINT:
              self._interrupt()

    threading.Thread(target=watch, name="ppd_jax-ctrl-c", daemon=True).start()

  def _interrupt(self) -> None:
    self._interrupts += 1
    if self._interrupts > 1:
      print("second Ctrl-C: quitting now without saving; the last checkpoint is intact",
            file=sys.stderr, flush=True)
      os._exit(QUIT_STATUS)   # at once: no cleanup, no traceback
    self.received = "SIGINT"
    if jax.process_index() == 0:
      print("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit at "
            "once without saving)", flush=True)
    if jax.process_count() > 1:   # let JAX's preemption sync pick the step all processes stop at
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """True at the step where every process should save and stop."""
    if jax.process_count() == 1:
      return self.received is not None
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption sync manager (a launch without jax.distributed)
      return False


def _noop(signum, frame) -> None:
  """Python's part of SIGINT: nothing (no KeyboardInterrupt); the wakeup fd carries it."""
  del signum, frame

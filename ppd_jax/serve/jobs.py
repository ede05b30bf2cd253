"""One worker thread for every model call: one at a time per process, a bounded queue, progress.

The page polls a job's state (queued with its place in the line, running with sampling steps
done out of steps expected, done with its result, failed with a message). A failure is logged
with its traceback here and reaches the page as one line, never as a traceback.
"""
import collections
import dataclasses
import logging
import queue
import threading
import time
import uuid
from typing import Any, Callable

from ppd_jax.diffusion import generation

log = logging.getLogger("ppd_jax.serve")


class Busy(Exception):
  """The queue is full: the request is refused, nothing is lost."""


@dataclasses.dataclass
class Job:
  id: str
  kind: str
  fn: Callable[[], Any]
  steps_total: int
  state: str = "queued"          # queued | running | done | failed
  steps_done: int = 0
  submitted: float = dataclasses.field(default_factory=time.monotonic)
  started: float | None = None
  finished: float | None = None
  result: Any = None
  error: str | None = None

  def step(self):
    self.steps_done += 1


class Jobs:
  """submit(kind, fn, steps) -> Job; status(id) -> dict; stop() ends the worker."""

  def __init__(self, max_queued: int = 8, keep: int = 64):
    self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
    self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
    self._order: collections.deque[str] = collections.deque()   # queued ids, in order
    self._lock = threading.Lock()
    self._keep = keep
    self._thread = threading.Thread(target=self._work, name="ppd-serve-worker", daemon=True)
    self._thread.start()

  def submit(self, kind: str, fn: Callable[[], Any], steps_total: int) -> Job:
    job = Job(id=uuid.uuid4().hex, kind=kind, fn=fn, steps_total=max(int(steps_total), 1))
    with self._lock:
      try:
        self._queue.put_nowait(job)
      except queue.Full:
        raise Busy(f"busy: {self._queue.qsize()} requests are waiting; try again shortly") \
            from None
      self._jobs[job.id] = job
      self._order.append(job.id)
      while len(self._jobs) > self._keep:    # forget the oldest finished ones
        old = next((k for k, j in self._jobs.items() if j.state in ("done", "failed")), None)
        if old is None:
          break
        del self._jobs[old]
    return job

  def status(self, job_id: str) -> dict | None:
    with self._lock:
      job = self._jobs.get(job_id)
      if job is None:
        return None
      ahead = list(self._order).index(job_id) if job_id in self._order else 0
      now = time.monotonic()
      out = {"id": job.id, "kind": job.kind, "state": job.state, "ahead": ahead,
             "steps_done": min(job.steps_done, job.steps_total),
             "steps_total": job.steps_total,
             "elapsed_s": round((job.finished or now) - (job.started or now), 3)}
      if job.state == "done":
        out["result"] = job.result
      if job.state == "failed":
        out["error"] = job.error
      return out

  def _work(self):
    while True:
      job = self._queue.get()
      if job is None:
        return
      with self._lock:
        self._order.remove(job.id)
        job.state, job.started = "running", time.monotonic()
      try:
        with generation.step_listener(job.step):
          result = job.fn()
        with self._lock:
          job.result, job.state = result, "done"
      except Exception as e:  # pylint: disable=broad-except  # reported on the page, logged here
        log.exception("%s job %s failed", job.kind, job.id)
        with self._lock:
          job.error, job.state = f"{job.kind} failed: {type(e).__name__}: {e}"[:500], "failed"
      finally:
        job.finished = time.monotonic()

  def stop(self, timeout: float = 5.0):
    """Lets the running job finish (up to timeout), drops the queued ones."""
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._queue.put(None)
    self._thread.join(timeout)

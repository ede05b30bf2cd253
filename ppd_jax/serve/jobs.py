"""One worker thread for every model call: one at a time per process, a bounded queue, progress.

The page polls a job's state: queued with its place in the line; running with its stages (the
engine names them: "pairs", "base", "personal"; Stable Cascade's as "base: stage C", then its
backbone's notices "base: stage B", "base: decode"), each with steps done out of steps expected,
and "compiling" while a stage's first call of a shape has not reached its first step; done with
its result (returned once, then dropped: results never pile up); failed with a one-line message
and a code. A failure is logged with its traceback here.
"""
import collections
import dataclasses
import logging
import queue
import threading
import time
import uuid
from typing import Any, Callable

from ppd_jax.diffusion import progress

log = logging.getLogger("ppd_jax.serve")


class Busy(Exception):
  """The queue is full: the request is refused, nothing is lost."""


class JobError(Exception):
  """A failure the page can act on: its code (the HTTP contract's) and one sentence."""

  def __init__(self, code: str, message: str):
    super().__init__(message)
    self.code = code


_current = {"job": None}   # the worker's running job (one worker thread per process)


def stage(name: str, total: int, compiling: bool = False) -> None:
  """Starts a stage of the running job (the previous one counts as complete); compiling: its
  first call of a shape, reported as "compiling" until its first step. A name "part: stage"
  (e.g. "base: stage C") also says which image the later notices belong to. No-op outside a
  job."""
  job = _current["job"]
  if job is not None:
    job.part = name.split(": ", 1)[0] if ": " in name else None
    job.begin(name, total, compiling)


def notice(name: str, total: int, compiling: bool = False) -> None:
  """A stage the model code announces (progress.notice_stage, e.g. Stable Cascade's "stage B"
  and "decode"), named within the current part: "base: stage B"."""
  job = _current["job"]
  if job is not None:
    job.begin(f"{job.part}: {name}" if job.part else name, total, compiling)


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
  code: str | None = None
  stages: list = dataclasses.field(default_factory=list)   # [{"name", "done", "total"}]
  compiling: bool = False
  part: str | None = None        # which image the stages are for ("base", "personal", "pairs")

  def step(self):
    self.steps_done += 1
    self.compiling = False
    if self.stages:
      self.stages[-1]["done"] = min(self.stages[-1]["done"] + 1, self.stages[-1]["total"])

  def begin(self, name: str, total: int, compiling: bool):
    if self.stages:
      self.stages[-1]["done"] = self.stages[-1]["total"]
    self.stages.append({"name": name, "done": 0, "total": max(int(total), 0)})
    self.compiling = compiling


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
    """The job's state (module doc); a done job's result is handed out once, then forgotten."""
    with self._lock:
      job = self._jobs.get(job_id)
      if job is None:
        return None
      ahead = list(self._order).index(job_id) if job_id in self._order else 0
      now = time.monotonic()
      current = job.stages[-1]["name"] if job.stages else job.kind
      out = {"id": job.id, "kind": job.kind, "state": job.state, "ahead": ahead,
             "stage": "compiling" if job.compiling and job.state == "running" else current,
             "stages": [dict(s) for s in job.stages],
             "steps_done": min(job.steps_done, job.steps_total),
             "steps_total": job.steps_total,
             "elapsed_s": round((job.finished or now) - (job.started or now), 3)}
      if job.state == "queued":
        out["place"] = ahead + 1
      if job.state == "done":
        out["result"] = job.result
        del self._jobs[job_id]
      if job.state == "failed":
        out["error"], out["code"] = job.error, job.code
      return out

  def _work(self):
    while True:
      job = self._queue.get()
      if job is None:
        return
      with self._lock:
        self._order.remove(job.id)
        job.state, job.started = "running", time.monotonic()
      _current["job"] = job
      try:
        with progress.step_listener(job.step, stage=notice):
          result = job.fn()
        with self._lock:
          if job.stages:
            job.stages[-1]["done"] = job.stages[-1]["total"]
          job.result, job.state = result, "done"
      except JobError as e:
        with self._lock:
          job.error, job.code, job.state = str(e)[:500], e.code, "failed"
      except ValueError as e:     # what was sent is wrong (e.g. an uploaded pairs file)
        with self._lock:
          job.error, job.code, job.state = f"{job.kind}: {e}"[:500], "invalid", "failed"
      except Exception as e:  # pylint: disable=broad-except  # reported on the page, logged here
        log.exception("%s job %s failed", job.kind, job.id)
        with self._lock:
          job.error = f"{job.kind} failed: {type(e).__name__}: {e}"[:500]
          job.code, job.state = "failed", "failed"
      finally:
        _current["job"], job.fn = None, None     # the closure may hold an upload: let it go
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

"""Progress of a pass over pairs (precompute's encoding, relabel's scoring): pairs/s and ETA."""
import time

from ppd_jax import metrics


class Progress:
  """Pairs/s and ETA over the pairs this process has left, logged at most every `every` s."""

  def __init__(self, total: int, log, every: float = 10.0, what: str = "precompute"):
    self.total, self.done, self.log, self.every, self.what = total, 0, log, every, what
    self._start = self._last = time.perf_counter()

  def add(self, n: int, force: bool = False) -> None:
    self.done += n
    now = time.perf_counter()
    if force or now - self._last >= self.every:
      self._last = now
      rate = self.done / max(now - self._start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      self.log(f"{self.what}: {self.done}/{self.total} pairs  {rate:.1f} pairs/s  "
               f"ETA {metrics.format_duration(eta)}")

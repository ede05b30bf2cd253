"""Where a run's numbers go: W/metrics.jsonl (one JSON object per logged step), TensorBoard event
files under W/tensorboard, and a progress line on the console (step, loss, pairs/s, ETA).
W may be a URL (gs://...): every file goes through ppd_jax.storage."""
import json
import time

import jax

from ppd_jax import storage


class MetricsWriter:
  """Writes from process 0 only. On resume, rows past the restored step are dropped first, so the
  file always describes one consistent run."""

  def __init__(self, workdir, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    workdir = storage.path(workdir)
    self.path = workdir / "metrics.jsonl"
    self._tb, self._mirror = None, None
    if not self.enabled:
      return
    storage.makedirs(workdir)
    _truncate_after(self.path, resume_step)
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes events
    tb_dir = workdir / "tensorboard"
    if storage.is_url(tb_dir):
      # tensorboardX's own gs:// writer covers GCS alone, through a second client
      # (google-cloud-storage) with its own credentials: events go to a local folder instead,
      # copied to the URL through the path layer at each flush.
      self._mirror = storage.LocalMirror(tb_dir)
    # A resumed run rewrites the steps after its checkpoint (or all of them, when a killed run
    # left events but no checkpoint); purge_step makes TensorBoard drop the earlier run's events
    # from that step on, so the curves do not overlap.
    self._tb = SummaryWriter(self._mirror.local if self._mirror else str(tb_dir),
                             purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    storage.append_text(self.path, json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()
    if self._mirror is not None:
      self._mirror.sync()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._mirror is not None:
      self._mirror.close()


def _truncate_after(path, step: int) -> None:
  """Keeps the rows up to `step`. A line that does not parse (the torn last line of a killed
  run) is dropped with a warning instead of stopping every later resume. Written atomically."""
  if not storage.exists(path):
    return
  rows = []
  for number, line in enumerate(storage.read_text(path).splitlines(keepends=True), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      keep = row["step"] <= step
    except (ValueError, KeyError, TypeError):
      log(f"warning: {path} line {number} is not a metrics row (a run killed while writing "
          f"it?); dropped: {line.strip()[:80]!r}")
      continue
    if keep:
      rows.append(line if line.endswith("\n") else line + "\n")
  storage.write_text(path, "".join(rows))


class Progress:
  """Steps, pairs/s and ETA, measured between log points."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int, throughput=None):
    """throughput: steps/s -> {tflops_per_device, mfu} (throughput.Throughput), or None."""
    self.total, self.batch, self.throughput = total_steps, batch_size, throughput
    self._t, self._step = time.perf_counter(), start_step

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    steps_per_s = (step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
    out = {"pairs_per_second": steps_per_s * self.batch, "eta_seconds": eta}
    if self.throughput is not None:
      out.update(self.throughput(steps_per_s))
    return out

  def pause(self, seconds: float) -> None:
    """Leaves time spent outside training steps (validation, saving) out of the rate."""
    self._t += seconds

  def format(self, step: int, metrics: dict, speed: dict) -> str:
    acc = metrics.get("implicit_accuracy", float("nan"))
    line = (f"step {step}/{self.total}  loss {metrics['loss']:.4f}  implicit_acc {acc:.3f}  "
            f"margin {metrics.get('reward_margin', float('nan')):+.3f}  "
            f"{speed['pairs_per_second']:.1f} pairs/s  ")
    if "tflops_per_device" in speed:
      line += f"{speed['tflops_per_device']:.3g} TFLOP/s/device  "
    if "mfu" in speed:
      line += f"MFU {100 * speed['mfu']:.1f}%  "
    if metrics.get("skipped_updates"):
      line += f"skipped {int(metrics['skipped_updates'])}  "
    return line + f"ETA {format_duration(speed['eta_seconds'])}"


def format_duration(seconds: float) -> str:
  """h:mm:ss (or m:ss), "?" when unknown."""
  if seconds == float("inf"):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)

"""Progress of compiled sampling loops, for a caller that shows it (the web page, ppd_jax/serve).

Inside `step_listener(fn)` every denoiser evaluation of a compiled loop that calls report_step()
calls fn() on the host (jax.debug.callback): one per sampling step for every sampler here (CFG
batches both branches into one call). Outside it the loops compile without any callback.
notice_stage names the stage that the next steps belong to (Stable Cascade: Stage C, Stage B,
the decode). Nothing here imports a backbone or a sampler, so both can report through it.
"""
import contextlib

import jax


_listener = {"fn": None, "stage": None}   # process-wide: XLA runs host callbacks on its threads


def _evaluated():
  fn = _listener["fn"]
  if fn is not None:
    fn()


def listening() -> bool:
  """Whether a step_listener is on: then a loop compiles with report_step, else without it."""
  return _listener["fn"] is not None


def report_step() -> None:
  """Inside a traced loop body: one host call to the listener per evaluation. Ordered, so the
  host sees the steps in order, once each; it reads no value, so no number changes."""
  jax.debug.callback(_evaluated, ordered=True)


def notice_stage(name: str, total: int, compiling: bool = False) -> None:
  """Tells the listener a stage of `total` steps starts (e.g. Stable Cascade's Stage B after the
  sampled Stage C latents); compiling: its first call of a shape. No-op when nobody listens."""
  fn = _listener["stage"]
  if fn is not None:
    fn(name, total, compiling)


@contextlib.contextmanager
def step_listener(fn, stage=None):
  """Calls fn() after each denoiser evaluation of sample_images (module doc), and stage(name,
  total, compiling) at each notice_stage. Process-wide, so one generation at a time should
  listen (the web demo runs one at a time)."""
  previous = dict(_listener)
  _listener.update(fn=fn, stage=stage)
  try:
    yield
  finally:
    _listener.update(previous)

"""Where the suite's time goes: seconds of jax tracing, lowering and XLA compiling per test.

Counted through jax's monitoring events (jax/_src/dispatch.py: JAXPR_TRACE_EVENT,
JAXPR_TO_MLIR_MODULE_EVENT, BACKEND_COMPILE_EVENT) in the pytest processes; subprocesses that a
test starts are not counted. Each process writes test-artifacts/compile_times_<worker>.json
({nodeid: {"trace", "lower", "compile", "wall": seconds}}, all phases of the test together); the
end of the run prints the totals and the tests that compile longest (docs/testing.md quotes a
fresh-clone run's).
"""
import collections
import glob
import json
import os
import time

import pytest

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "test-artifacts")
_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
           "/jax/core/compile/backend_compile_duration": "compile"}
_now = {"test": None}
_times = collections.defaultdict(lambda: collections.defaultdict(float))
_started = time.time()


def _listener(event, duration, **_):
  kind = _EVENTS.get(event)
  if kind and _now["test"]:
    _times[_now["test"]][kind] += duration


def pytest_configure(config):
  del config
  from jax._src import monitoring  # pylint: disable=import-outside-toplevel
  monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  _now["test"] = item.nodeid
  start = time.perf_counter()
  yield
  _times[item.nodeid]["wall"] += time.perf_counter() - start
  _now["test"] = None


def _path(worker: str) -> str:
  return os.path.join(ARTIFACTS, f"compile_times_{worker}.json")


def pytest_sessionfinish(session):
  worker = getattr(session.config, "workerinput", {}).get("workerid", "main")
  os.makedirs(ARTIFACTS, exist_ok=True)
  with open(_path(worker), "w", encoding="utf-8") as f:
    json.dump({k: dict(v) for k, v in _times.items()}, f, indent=0)


def pytest_terminal_summary(terminalreporter, config):
  if hasattr(config, "workerinput"):
    return
  merged = {k: dict(v) for k, v in _times.items()}   # this process's (no workers)
  for path in glob.glob(_path("gw*")):
    if os.path.getmtime(path) >= _started:
      with open(path, encoding="utf-8") as f:
        merged.update(json.load(f))
  if not merged:
    return
  total = collections.Counter()
  for t in merged.values():
    total.update(t)
  jax_s = total["trace"] + total["lower"] + total["compile"]
  terminalreporter.write_sep("=", "jax time in the pytest processes (compile_report.py)")
  terminalreporter.write_line(
      f"tests {total['wall']:.0f} s in all; of that, jax tracing {total['trace']:.0f} s, lowering "
      f"{total['lower']:.0f} s, XLA compiling {total['compile']:.0f} s ({jax_s / max(total['wall'], 1e-9):.0%})")
  for nodeid, t in sorted(merged.items(), key=lambda kv: -kv[1].get("compile", 0))[:15]:
    terminalreporter.write_line(f"  compile {t.get('compile', 0):6.1f} s of {t['wall']:6.1f} s  {nodeid}")

"""cli_logging.py: every command calls it, and its filter keeps this package's INFO lines and
every warning while dropping libraries' INFO lines. The table1 command's own output is checked in
tests/test_table1.py::test_the_command_line (no Orbax INFO line, our restore line kept)."""
import logging
import os
import re
import subprocess
import sys

from ppd_jax import cli_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def orbax_info_lines(stderr: str) -> list[str]:
  """absl-format INFO lines whose source file is one of orbax's and none of ours."""
  import orbax.checkpoint
  orbax_dir = os.path.dirname(os.path.dirname(orbax.checkpoint.__file__))
  theirs = {n for _, _, files in os.walk(orbax_dir) for n in files if n.endswith(".py")}
  ours = {n for _, _, files in os.walk(os.path.join(ROOT, "ppd_jax")) for n in files}
  lines = []
  for line in stderr.splitlines():
    m = re.match(r"I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]", line)
    if m and m.group(1) in theirs - ours:
      lines.append(line)
  return lines


def test_every_command_sets_up_its_logging():
  """Each `python -m ppd_jax.…` entry point (a module calling absl's app.run) calls setup()."""
  missing = []
  for folder, _, files in os.walk(os.path.join(ROOT, "ppd_jax")):
    for name in files:
      path = os.path.join(folder, name)
      if not name.endswith(".py"):
        continue
      text = open(path).read()
      if re.search(r"^\s+_?app\.run\(", text, re.M) and "cli_logging.setup()" not in text:
        missing.append(os.path.relpath(path, ROOT))
  assert not missing, f"commands without cli_logging.setup(): {missing}"


def record(level, pathname):
  return logging.LogRecord("absl", level, pathname, 1, "m", None, None)


def test_the_filter_keeps_ours_and_warnings():
  f = cli_logging.OwnInfoOnly()
  ours = os.path.join(ROOT, "ppd_jax", "checkpoint.py")
  lib = "/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert f.filter(record(logging.INFO, ours))
  assert not f.filter(record(logging.INFO, lib))
  assert not f.filter(record(logging.DEBUG, lib))
  assert f.filter(record(logging.WARNING, lib)) and f.filter(record(logging.ERROR, lib))


SCRIPT = """
import logging as std
from absl import app, logging
from ppd_jax import cli_logging
from ppd_jax import checkpoint       # a file of ours, to log as
import orbax.checkpoint.checkpoint_manager as lib

def main(argv):
  cli_logging.setup()
  for mod, name in ((checkpoint, "ours"), (lib, "theirs")):
    src = (f"logging.info('{name} absl info'); logging.warning('{name} absl warning')\\n"
           f"std.getLogger('x').info('{name} std info')")
    exec(compile(src, mod.__file__, "exec"), {"logging": logging, "std": std})  # as that file
app.run(main)
"""


def test_a_command_keeps_its_info_and_library_warnings():
  """Through absl's app.run: records logged from code in an orbax file (absl and std logging)
  pass only at WARNING; those from a ppd_jax file pass at INFO too; --verbosity=1 passes all."""
  def run(*flags):
    done = subprocess.run([sys.executable, "-c", SCRIPT, *flags], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr
  err = run()
  assert "ours absl info" in err and "ours std info" in err and "ours absl warning" in err
  assert "theirs absl warning" in err
  assert "theirs absl info" not in err and "theirs std info" not in err
  err = run("--verbosity=1")
  assert "theirs absl info" in err and "theirs std info" in err

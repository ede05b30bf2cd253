"""Checks documented `python -m ppd_jax.X ARGS` commands against the CLIs' real flags, by name.

  python tests/docs_cli_probe.py REQUESTS.json RESULTS.json     (cwd: the repository root)

REQUESTS.json is a list of {"module": "ppd_jax.X", "args": [...]}; RESULTS.json the list of
problems (strings) for each, in the same order. Used by tests/test_docs_commands.py.

Each module runs in a forked child, as `python -m` would run it (runpy, run_name="__main__"), with
absl's `app.run` (and argparse's `parse_args`) replaced by a stop: the child then holds exactly the
flags that command line would be parsed against, whether they are defined at import, under
`if __name__ == "__main__":` or by a shared `define_flags()`. A fork per module keeps one module's
flags out of another's (absl's FLAGS is global: the same name defined twice is an error) while
jax, flax and ml_collections, which define no absl flags, are imported once, in the parent.

The names are then matched the way absl parses them (absl/flags/_flagvalues.py,
FlagValues._parse_args): `--name`, `-name`, `--name=value`, `--name value`, `--noname` for a
boolean, `--undefok`, `--flagfile`; and a `--config.a.b=V` override the way ml_collections resolves
it (ml_collections/config_flags/config_flags.py, _ConfigFlag._parse: config_path.get_type on the
config that `--config=FILE:VARIANT` loads through the flag's own parser, or the flag's default).
Values are not parsed: placeholders (DIR, W, $VAR, <...>) are fine.
"""
import argparse
import importlib.util
import json
import os
import re
import runpy
import sys
import time
import traceback

import absl.app
import absl.flags
import absl.logging  # noqa: F401  (its flags are every absl program's: --verbosity, ...)
from ml_collections.config_flags import config_flags
from ml_collections.config_flags import config_path

# Imported once here, before the forks. None of them defines an absl flag (grain, imported by
# some CLIs, does: it is left to the modules that import it).
for _slow in ("jax", "flax.linen", "optax"):
  importlib.import_module(_slow)

CHILD_TIMEOUT_S = 120
_PLACEHOLDER = re.compile(r"[$<>]|\.\.\.|\b[A-Z][A-Z0-9_]*\b")


class _Stop(BaseException):
  """Raised where the module would parse its command line (a BaseException: no `except
  Exception` in a module swallows it)."""


def _find(module: str) -> str | None:
  """None where `python -m module` can start, else why not."""
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError) as e:
    return f"no module {module} ({e})"
  if spec is None:
    return f"no module {module}"
  if spec.submodule_search_locations is not None:
    if importlib.util.find_spec(module + ".__main__") is None:
      return f"{module} is a package without __main__.py"
  return None


def _run_to_flag_parsing(module: str) -> tuple[str | None, list]:
  """Runs the module as `python -m` would, up to its command-line parsing. Returns (why it did
  not get there, or None; the argparse parsers it built)."""
  parsers = []

  def stop_absl(*args, **kwargs):
    del args, kwargs
    absl.app.define_help_flags()          # app.run defines --help, --helpfull, ... first
    raise _Stop()

  def stop_argparse(self, *args, **kwargs):
    del args, kwargs
    parsers.append(self)
    raise _Stop()

  absl.app.run = stop_absl
  parse = absl.flags.FlagValues.__call__
  absl.flags.FlagValues.__call__ = (
      lambda self, *a, **k: stop_absl() if self is absl.flags.FLAGS else parse(self, *a, **k))
  argparse.ArgumentParser.parse_args = stop_argparse
  argparse.ArgumentParser.parse_known_args = stop_argparse
  sys.argv = [module]
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except _Stop:
    return None, parsers
  except SystemExit as e:
    return f"exits before parsing its flags (exit {e.code!r})", parsers
  except BaseException as e:  # pylint: disable=broad-except
    last = traceback.format_exception_only(type(e), e)[-1].strip()
    return f"fails before parsing its flags: {last}", parsers
  return "parses no command line (no absl app.run, no argparse)", parsers


def _load(flag, spec: str, cache: dict):
  """The config `--NAME=spec` loads, through the flag's own parser (config_flags'
  ConfigFileFlagParser: FILE, or FILE:VARIANT passed to get_config), or why it does not load."""
  if spec not in cache:
    try:
      cache[spec] = flag.parser.parse(spec)
      getattr(cache[spec], "keys", lambda: None)()    # a missing file loads as an error object
    except Exception as e:  # pylint: disable=broad-except
      lines = str(e).strip().splitlines()
      cache[spec] = f"--{flag.name}={spec} does not load: {lines[-1] if lines else repr(e)}"
  return cache[spec]


def _check_override(flag, path: str, config) -> str | None:
  """None if `--NAME.path` names a field of `config`, as ml_collections resolves it."""
  if getattr(flag, "_accept_new_attributes", False):
    return None
  try:
    config_path.get_type(path, config)
  except (AttributeError, KeyError, IndexError):
    return f"--{flag.name}.{path}: the config has no field {path}"
  except Exception as e:  # pylint: disable=broad-except
    return f"--{flag.name}.{path}: {type(e).__name__}: {e}"
  return None


def _check_absl(fv, args: list[str]) -> list[str]:
  problems, cache = [], {}
  configs = {}      # config flag name -> the config the command line loads so far (None: unknown)
  flags_ = {name: fv[name] for name in fv}
  it = iter(args)
  for arg in it:
    if arg == "--":
      break
    if not arg.startswith("-") or arg == "-":
      continue                                # a value or positional argument
    body = arg[2:] if arg.startswith("--") else arg[1:]
    name, value = (body.split("=", 1) + [None])[:2]
    if name in ("undefok", "flagfile"):
      continue
    flag = flags_.get(name)
    if flag is not None:
      if not flag.boolean and value is None:
        value = next(it, None)                # `--name value`
      if config_flags.is_config_flag(flag):
        configs[name] = None                  # a placeholder: fields cannot be checked
        if value is not None and not _PLACEHOLDER.search(value):
          loaded = _load(flag, value, cache)
          if isinstance(loaded, str):
            problems.append(loaded)
          else:
            configs[name] = loaded
      continue
    if name.startswith("no") and name[2:] in flags_ and flags_[name[2:]].boolean:
      continue
    head, _, path = name.partition(".")
    if head.startswith("no") and head[2:] in flags_:
      head = head[2:]                         # `--noconfig.flag`: a boolean override
    if path and head in flags_ and config_flags.is_config_flag(flags_[head]):
      if any(re.match(rf"^--?{re.escape(head)}(=|$)", a) for a in args) and head not in configs:
        problems.append(f"{arg}: an override before --{head}=... (ml_collections refuses it)")
        continue
      config = configs.get(head, flags_[head].value)     # no --NAME=...: the flag's default
      if head not in configs and config is None:
        problems.append(f"{arg}: no --{head}=FILE given and the flag has no default")
      elif config is not None:
        why = _check_override(flags_[head], path, config)
        if why:
          problems.append(why)
      continue
    problems.append(f"unknown flag --{name} (--helpfull lists the flags)")
  return problems


def _check_argparse(parser, args: list[str]) -> list[str]:
  known = set(parser._option_string_actions)   # pylint: disable=protected-access
  return [f"unknown flag {a.split('=', 1)[0]}" for a in args
          if a.startswith("-") and a != "-" and a.split("=", 1)[0] not in known]


def _probe(module: str, arg_lists: list[list[str]]) -> list[list[str]]:
  """Problems per command line of one module; runs in a forked child."""
  missing = _find(module)
  if missing:
    return [[missing] for _ in arg_lists]
  why, parsers = _run_to_flag_parsing(module)
  if why:
    return [[f"{module} {why}"] for _ in arg_lists]
  if parsers:
    return [_check_argparse(parsers[-1], args) for args in arg_lists]
  return [_check_absl(absl.flags.FLAGS, args) for args in arg_lists]


def _in_child(module: str, arg_lists: list[list[str]], out_path: str) -> int:
  """Forks; the child writes its problems to out_path. Returns the child's pid."""
  pid = os.fork()
  if pid:
    return pid
  code = 1
  try:
    os.dup2(2, 1)                             # a module's prints must not mix with ours
    result = _probe(module, arg_lists)
    with open(out_path, "w") as f:
      json.dump(result, f)
    code = 0
  finally:
    os._exit(code)                            # pylint: disable=protected-access


def main(requests_path: str, results_path: str) -> None:
  with open(requests_path) as f:
    requests = json.load(f)
  sys.path.insert(0, os.getcwd())             # as `python -m` does: configs/ is importable
  by_module: dict[str, list[int]] = {}
  for i, r in enumerate(requests):
    by_module.setdefault(r["module"], []).append(i)
  results: list[list[str] | None] = [None] * len(requests)
  out_dir = os.path.dirname(os.path.abspath(results_path))
  for n, (module, indices) in enumerate(sorted(by_module.items())):
    out = os.path.join(out_dir, f"probe_{n}.json")
    pid = _in_child(module, [requests[i]["args"] for i in indices], out)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not os.waitpid(pid, os.WNOHANG)[0]:
      if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        break
      time.sleep(0.02)
    if os.path.exists(out):
      with open(out) as f:
        for i, problems in zip(indices, json.load(f)):
          results[i] = problems
    for i in indices:
      if results[i] is None:
        results[i] = [f"{module}: probing it crashed or took over {CHILD_TIMEOUT_S} s"]
  with open(results_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])

"""Every `python -m ppd_jax.X ...` command in README.md and docs/**/*.md names a module that
`python -m` can run, and only flags and `--config.FIELD` overrides that the command accepts.

Commands are found in fenced code blocks (shell or unlabelled: a ```python block is not run by a
shell), in indented code blocks and in inline code (which may run over several lines of a
paragraph). A line ending in a backslash continues the command; `&&`, `;`, `|` (as separate
words), redirections and `#` comments end it; `[--flag=V]` (an optional flag) is checked as
`--flag=V`; `ppd_jax.…` (prose about commands in general) is not a command.

One subprocess (tests/docs_cli_probe.py) checks them all: a forked child per module runs it as
`python -m` would, stopped where it parses its command line, so a module's flags are exactly those
defined by then (at import, under `__main__`, or by a shared define_flags()); the names are
matched as absl and ml_collections match them, and each `--config=FILE:VARIANT` is loaded.

Limits: values are not checked (placeholders such as DIR, W, $VAR, <...> are fine), nor a config
FILE:VARIANT that is itself a placeholder (a word in capitals, $VAR, <...>), nor the fields
overridden on it; words a shell would expand (`$(...)`, globs, here-documents) are taken as
written; argparse flags must be written in full (argparse also takes unique prefixes); a module
that fails at import in the test environment is reported as failing, not skipped.
"""
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "docs_cli_probe.py")
_SHELL_FENCES = ("", "bash", "sh", "shell", "console", "zsh", "text")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
_ENDS = {"&&", "||", ";", "|", "&", ")", "<<"}
_REDIRECT = re.compile(r"^\d*[<>]")                     # `> out.txt`, `2>&1`, `<in`
_PLACEHOLDER = re.compile(r"<[^<>]+>")                  # `<dir>`: a value, not a redirection


@dataclass(frozen=True)
class Command:
  path: str        # the doc, relative to its root
  line: int        # 1-based line where the command starts
  text: str        # the command as written (continuations joined)
  module: str
  args: tuple


def doc_files(root: str = ROOT) -> list[str]:
  """README.md and every docs/**/*.md under root."""
  files = [os.path.join(root, "README.md")]
  files += sorted(glob.glob(os.path.join(root, "docs", "**", "*.md"), recursive=True))
  return [f for f in files if os.path.isfile(f)]


def _words(text: str) -> list[str]:
  """Shell words, quotes removed, a `#` comment dropped."""
  try:
    return shlex.split(text, comments=True)
  except ValueError:                                      # an unbalanced quote in prose
    return text.split("#")[0].split()


def commands_in(text: str) -> list[tuple[str, list[str]]]:
  """(module, args) of each `python -m ppd_jax...` in one shell line."""
  words, found = _words(text), []
  for i in range(len(words) - 2):
    module = re.match(r"ppd_jax\b[\w.]*", words[i + 2])
    if (os.path.basename(words[i]) in ("python", "python3") and words[i + 1] == "-m"
        and module and words[i + 2][module.end():] not in ("…", "...")):   # not `ppd_jax.…`
      args = []
      for word in words[i + 3:]:
        if word in _ENDS or _REDIRECT.match(word) and not _PLACEHOLDER.fullmatch(word):
          break
        if word.endswith(";"):
          args.append(word[:-1])
          break
        args.append(word.strip("[]"))
      found.append((words[i + 2].rstrip(".,:;"), args))
  return found


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
  """Joins lines ending in a backslash with the next."""
  out, start, parts = [], None, []
  for number, line in lines:
    if start is None:
      start = number
    if line.rstrip().endswith("\\"):
      parts.append(line.rstrip()[:-1])
      continue
    parts.append(line)
    out.append((start, " ".join(parts)))
    start, parts = None, []
  if parts:
    out.append((start, " ".join(parts)))
  return out


def _is_indented_command(line: str) -> bool:
  """A line of an indented code block (4 spaces or a tab, also inside a list item)."""
  return (line.startswith(("    ", "\t")) and "`" not in line
          and re.search(r"python3?\s+-m\s+ppd_jax", line) is not None)


def find_commands(path: str, root: str) -> list[Command]:
  """Every `python -m ppd_jax...` command in one markdown file."""
  with open(path) as f:
    lines = f.read().splitlines()
  rel = os.path.relpath(path, root)
  snippets = []                                         # (line number, shell text)
  prose = []                                            # (line number, text) outside code
  i = 0
  while i < len(lines):
    fence = _FENCE.match(lines[i])
    if fence:
      close = re.compile(rf"^\s*{fence.group(1)[0]}{{{len(fence.group(1))},}}\s*$")
      j = i + 1
      while j < len(lines) and not close.match(lines[j]):
        j += 1
      if fence.group(2).lower() in _SHELL_FENCES:
        snippets += _logical_lines([(k + 1, lines[k]) for k in range(i + 1, j)])
      prose.append((i + 1, ""))                         # a fence ends a paragraph
      i = j + 1
      continue
    if _is_indented_command(lines[i]):
      j = i
      while lines[j].rstrip().endswith("\\") and j + 1 < len(lines):
        j += 1
      snippets += _logical_lines([(k + 1, lines[k]) for k in range(i, j + 1)])
      prose.append((i + 1, ""))
      i = j + 1
      continue
    prose.append((i + 1, lines[i]))
    i += 1
  # Inline code: spans run within a paragraph (blank lines end it), possibly over several lines.
  paragraph: list[tuple[int, str]] = []
  for number, line in prose + [(0, "")]:
    if line.strip():
      paragraph.append((number, line))
      continue
    if paragraph:
      text = "\n".join(l for _, l in paragraph)
      for m in re.finditer(r"(`+)(.+?)(?<!`)\1(?!`)", text, re.DOTALL):
        if "python" in m.group(2):
          snippets.append((paragraph[0][0] + text.count("\n", 0, m.start()),
                           " ".join(m.group(2).split())))
    paragraph = []
  return [Command(rel, number, " ".join(snippet.split()), module, tuple(args))
          for number, snippet in sorted(snippets) for module, args in commands_in(snippet)]


def check(commands: list[Command], scratch: str) -> list[list[str]]:
  """The problems of each command (unknown module, flag or config field), in one subprocess."""
  requests = os.path.join(scratch, "requests.json")
  results = os.path.join(scratch, "results.json")
  with open(requests, "w") as f:
    json.dump([{"module": c.module, "args": list(c.args)} for c in commands], f)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  done = subprocess.run([sys.executable, PROBE, requests, results], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(results) as f:
    return json.load(f)


def report(commands: list[Command], problems: list[list[str]]) -> list[str]:
  """One entry per problem: file:line: what is unknown, then the command."""
  return [f"{c.path}:{c.line}: {problem}\n    {c.text}"
          for c, found in zip(commands, problems) for problem in found]


# Docs with one of each mistake, and each accepted form beside them.
_PLANTED_README = """\
# Title

```bash
python -m ppd_jax.export --workdir=W --out=DIR --bogus_flag=3
python -m ppd_jax.no_such_module --workdir=W
python -m ppd_jax.train --config=configs/ppd.py:tiny --workdir=W \\
    --config.no_such_field=1
python -m ppd_jax.train --config=configs/ppd.py:no_such_variant --workdir=W
python -m ppd_jax.train --config.seed=1 --config=configs/ppd.py:tiny --workdir=W
```

Accepted: `python -m ppd_jax.train --config=configs/ppd.py:tiny --workdir W
--config.optim.lr=1e-3 --noalsologtostderr --helpfull` and, indented:

    python -m ppd_jax.demo.multireward --workdir=W [--config.no_such=2 --config.seed=1] # --no
    python -m ppd_jax.sample --workdir=$RUN --out <dir> --seed -1 --prompt="a b" && ls -la out
    python -m ppd_jax.train --config=configs/ppd.py:VARIANT --config.anything=1

```python
>>> python -m ppd_jax.not_in_a_shell_block --x
```
"""
_PLANTED_DOC = """\
An inline mistake: `python -m ppd_jax.sample --workdir=W
--user_scael=0`.

~~~sh
python -m ppd_jax.evals.winrate --run=R --out=O --judge=synthetic --nocot --judge_mdoel=M
python -m ppd_jax.sample --workdir=W --nouser_scale
~~~
Every `python -m ppd_jax.…` command is checked.
"""


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
  """The real docs' commands and the planted docs', checked in one probe run."""
  planted = tmp_path_factory.mktemp("planted")
  (planted / "docs").mkdir()
  (planted / "README.md").write_text(_PLANTED_README)
  (planted / "docs" / "sampling.md").write_text(_PLANTED_DOC)
  real = [c for f in doc_files(ROOT) for c in find_commands(f, ROOT)]
  fake = [c for f in doc_files(str(planted)) for c in find_commands(f, str(planted))]
  problems = check(real + fake, str(tmp_path_factory.mktemp("probe")))
  return (real, problems[:len(real)]), (fake, problems[len(real):])


def test_every_documented_command_exists(checked):
  (real, problems), _ = checked
  assert real, "no `python -m ppd_jax...` command found in README.md or docs/"
  lines = report(real, problems)
  assert not lines, (f"{len(lines)} problems in the documented commands:\n" + "\n".join(lines))


def test_planted_mistakes_are_found_and_named(checked):
  _, (fake, problems) = checked
  sampling = os.path.join("docs", "sampling.md")
  assert [(c.path, c.line, c.module) for c in fake] == [
      ("README.md", 4, "ppd_jax.export"), ("README.md", 5, "ppd_jax.no_such_module"),
      ("README.md", 6, "ppd_jax.train"), ("README.md", 8, "ppd_jax.train"),
      ("README.md", 9, "ppd_jax.train"), ("README.md", 12, "ppd_jax.train"),
      ("README.md", 15, "ppd_jax.demo.multireward"), ("README.md", 16, "ppd_jax.sample"),
      ("README.md", 17, "ppd_jax.train"),
      (sampling, 1, "ppd_jax.sample"), (sampling, 5, "ppd_jax.evals.winrate"),
      (sampling, 6, "ppd_jax.sample")]
  expected = [("README.md:4:", "--bogus_flag", "--bogus_flag=3"),
              ("README.md:5:", "no module ppd_jax.no_such_module", "ppd_jax.no_such_module --"),
              ("README.md:6:", "no field no_such_field", "--config.no_such_field=1"),
              ("README.md:8:", "ppd.py:no_such_variant does not load", "no_such_variant --"),
              ("README.md:9:", "--config.seed=1: an override before --config", "--config=c"),
              ("README.md:15:", "no field no_such", "--workdir=W [--config.no_such=2"),
              (f"{sampling}:1:", "unknown flag --user_scael", "--workdir=W --user_scael=0"),
              (f"{sampling}:5:", "unknown flag --judge_mdoel", "--nocot --judge_mdoel=M"),
              (f"{sampling}:6:", "unknown flag --nouser_scale", "--workdir=W --nouser_scale")]
  lines = report(fake, problems)
  assert len(lines) == len(expected), "\n".join(lines)
  for line, (where, what, command) in zip(lines, expected):
    head, text = line.split("\n")
    assert head.startswith(where) and what in head and command in text, line

"""The package's import layering (docs/architecture.md), read from the source with ast: no import
cycle between modules, and no import against the layer rules. Imports inside functions count too:
a cycle that only closes at run time is still one. No module is imported, so this takes well under
a second."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (importer packages, forbidden packages, why). A package name covers its submodules.
RULES = (
    (("ppd_jax.data",),
     ("ppd_jax.users", "ppd_jax.demo", "ppd_jax.demo_world", "ppd_jax.evals", "ppd_jax.serve",
      "ppd_jax.sources", "ppd_jax.trainer", "ppd_jax.inference"),
     "data/ is the bottom of the data flow: the user-embedding store lives in data/, the "
     "choice between the real and the demo's sources is made in ppd_jax/sources.py, and "
     "labelling pairs with reward models reads rewards/, not evals/"),
    (("ppd_jax.models", "ppd_jax.diffusion", "ppd_jax.weights"),
     ("ppd_jax.data", "ppd_jax.users", "ppd_jax.evals", "ppd_jax.rewards", "ppd_jax.demo",
      "ppd_jax.demo_world", "ppd_jax.serve", "ppd_jax.sources", "ppd_jax.trainer"),
     "the model layer knows nothing of data, users, rewards, evaluation or the demo"),
    (("ppd_jax.users",),
     ("ppd_jax.demo", "ppd_jax.demo_world", "ppd_jax.evals", "ppd_jax.serve", "ppd_jax.trainer"),
     "users/ turns labelled pairs into embeddings; it reads data/, nothing above it"),
    (("ppd_jax.rewards",),
     ("ppd_jax.data", "ppd_jax.users", "ppd_jax.evals", "ppd_jax.demo", "ppd_jax.demo_world",
      "ppd_jax.serve", "ppd_jax.sources", "ppd_jax.trainer", "ppd_jax.inference"),
     "the reward models serve both labelling (data/) and evaluation (evals/), so they import "
     "neither: only models/, weights/ and the top-level helpers"),
)
# Every module outside ppd_jax.demo: nothing but the demo itself runs the demo.
DEMO = "ppd_jax.demo"
# Allowed exceptions to RULES, as {(importer, imported): reason}; docs/architecture.md lists them.
# None today.
EXCEPTIONS: dict = {}


def _within(module: str, package: str) -> bool:
  return module == package or module.startswith(package + ".")


def module_graph(root: pathlib.Path, package: str = "ppd_jax") -> dict:
  """{module: {imported module: (file, line) of the first such import}} for the modules of
  root/package; `from a import b` counts as a.b when that is a module, else as a."""
  files = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    files[name] = path
  graph = {m: {} for m in files}
  for name, path in files.items():
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [_enclosing(a.name, files) for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = here.split(".")[:len(here.split(".")) - node.level + 1]
          base = ".".join(anchor + ([node.module] if node.module else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else _enclosing(base, files)
                   for a in node.names]
      else:
        continue
      where = (str(path.relative_to(root)), node.lineno)
      for target in targets:
        if target and target != name:
          graph[name].setdefault(target, where)
  return graph


def _enclosing(module: str, files: dict) -> str | None:
  """The module itself, or its nearest package that is part of the tree; None outside it."""
  while module and module not in files:
    module = module.rpartition(".")[0]
  return module or None


def cycles(graph: dict) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  for start in graph:
    if start in index:
      continue
    work = [(start, iter(graph[start]))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, successors = work[-1]
      for nxt in successors:
        if nxt not in index:
          index[nxt] = low[nxt] = len(index)
          stack.append(nxt)
          on_stack.add(nxt)
          work.append((nxt, iter(graph[nxt])))
          break
        if nxt in on_stack:
          low[node] = min(low[node], index[nxt])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          component = []
          while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == node:
              break
          if len(component) > 1:
            out.append(sorted(component))
  return out


def describe_cycle(graph: dict, component: list[str]) -> str:
  inside = set(component)
  edges = [f"  {m} -> {d} ({f}:{line})" for m in component
           for d, (f, line) in sorted(graph[m].items()) if d in inside]
  return "import cycle among " + ", ".join(component) + ":\n" + "\n".join(edges)


def violations(graph: dict, rules=RULES, demo: str = DEMO, exceptions=EXCEPTIONS) -> list[str]:
  """One line per forbidden import, naming the file, line, importer and imported module."""
  out = []
  for importer, imported in graph.items():
    for target, (f, line) in sorted(imported.items()):
      if (importer, target) in exceptions:
        continue
      for sources, forbidden, why in rules:
        bad = next((p for p in forbidden if _within(target, p)), None)
        if any(_within(importer, s) for s in sources) and bad:
          out.append(f"{f}:{line}: {importer} imports {target}; "
                     f"{', '.join(sources)} may not import {bad} ({why})")
      if _within(target, demo) and not _within(importer, demo):
        out.append(f"{f}:{line}: {importer} imports {target}; only {demo} may import the demo")
  return out


@pytest.fixture(scope="module")
def graph():
  return module_graph(ROOT)


def test_the_package_has_no_import_cycle(graph):
  found = cycles(graph)
  assert not found, "\n".join(describe_cycle(graph, c) for c in found)


def test_no_import_breaks_the_layer_rules(graph):
  found = violations(graph)
  assert not found, "\n".join(found)


def test_every_allowed_exception_is_still_an_import(graph):
  """A stale exception would silently allow the import again later."""
  stale = [pair for pair in EXCEPTIONS if pair[1] not in graph.get(pair[0], {})]
  assert not stale, f"EXCEPTIONS names imports that no longer exist: {stale}"


def test_the_checks_name_a_cycle_and_a_forbidden_import(tmp_path):
  """The checker itself, on a made-up package: a cycle through an import inside a function, a
  relative import, and data/ importing the demo."""
  pkg = tmp_path / "ppd_jax"
  for sub in ("data", "demo", "users"):
    (pkg / sub).mkdir(parents=True)
    (pkg / sub / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text("")
  (pkg / "data" / "a.py").write_text("import os\nfrom . import b\n")
  (pkg / "data" / "b.py").write_text("def f():\n  from ppd_jax.data import a\n")
  (pkg / "data" / "c.py").write_text("x = 1\n\n\nfrom ppd_jax.demo import run\n")
  (pkg / "demo" / "run.py").write_text("from ppd_jax.data import c\n")
  (pkg / "users" / "u.py").write_text("from ppd_jax.data.c import x\n")
  g = module_graph(tmp_path)
  assert g["ppd_jax.users.u"] == {"ppd_jax.data.c": ("ppd_jax/users/u.py", 1)}
  found = cycles(g)
  assert sorted(found) == [["ppd_jax.data.a", "ppd_jax.data.b"],
                           ["ppd_jax.data.c", "ppd_jax.demo.run"]]
  text = describe_cycle(g, ["ppd_jax.data.a", "ppd_jax.data.b"])
  assert "ppd_jax.data.b -> ppd_jax.data.a (ppd_jax/data/b.py:2)" in text
  bad = violations(g, exceptions={})
  assert any(v.startswith("ppd_jax/data/c.py:4: ppd_jax.data.c imports ppd_jax.demo.run;")
             and "may not import ppd_jax.demo " in v for v in bad), bad
  assert any("only ppd_jax.demo may import the demo" in v for v in bad), bad
  assert not any(v.startswith("ppd_jax/users/u.py") for v in bad), bad

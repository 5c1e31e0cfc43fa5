"""The package's layers, checked by reading its source (`ast`, no imports).

named_embed's code lives in ``named_embed/_src/<layer>/``; the public
front (``named_embed/__init__.py``, ``sharding.py``, ``formats/``,
``__main__.py``, ``demo/``) sits above every layer. These tests hold:

- no import circle among the package's modules (module-level imports);
- a module of a layer imports, at module level, modules of its own layer
  or of lower ones only (`LAYERS`), and never the public front;
- an import inside a function (deferred) has a comment on its line or on
  the comment lines just above it saying why;
- no module imports another module's private (``_name``) names;
- only the table layer tells the kinds of table apart: no ``hasattr``
  probing and no ``type(x) is <table class>`` /
  ``isinstance(x, <compressed or adapted table>)`` elsewhere.

The layer table is a dict so that adding or reordering a layer is one
edit; imports under ``if TYPE_CHECKING:`` are type-only and not counted.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import io
import pathlib
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "named_embed"
SRC = "named_embed._src"

# The layers of `named_embed._src`, lowest first.
LAYERS = {
  "base": 0,
  "rows": 1,
  "tables": 2,
  "ops": 3,
  "tools": 4,
  "files": 5,
}
PUBLIC = max(LAYERS.values()) + 1  # everything outside _src
TABLE_LAYER = "tables"  # where telling the kinds of table apart belongs
TABLE_CLASSES = {
  "EmbeddingTable",
  "QuantizedTable",
  "LoraTable",
  "TrainableRowsTable",
}
OTHER_KINDS = TABLE_CLASSES - {"EmbeddingTable"}
# `hasattr` may ask whether an argument is array-like, never what a table
# can do.
ARRAY_PROTOCOL = {"dtype", "shape", "ndim", "named_shape"}
# Modules whose job is recognising other libraries' objects without
# importing those libraries (duck typing), and why.
DUCK_TYPING = {
  f"{SRC}.files.converters": "flax, torch and brainstate objects, whose"
  " libraries named_embed does not import",
}


# ------------------------------------------------------------ reading code


@dataclasses.dataclass(frozen=True)
class Import:
  module: str  # the importing module
  path: str  # its file, relative to the repository
  line: int
  text: str  # the statement
  targets: tuple[str, ...]  # named_embed modules it imports
  names: tuple[tuple[str, str], ...]  # (from module, name) of `from` imports
  deferred: bool  # inside a function
  type_only: bool  # under `if TYPE_CHECKING:`


@dataclasses.dataclass
class Module:
  name: str
  path: pathlib.Path
  tree: ast.Module
  source: str
  imports: list[Import]
  comment_lines: dict[int, str]  # line -> comment text

  @property
  def rel(self) -> str:
    return str(self.path.relative_to(ROOT))

  @property
  def layer(self) -> str | None:
    parts = self.name.split(".")
    if self.name.startswith(SRC + ".") and len(parts) > 2:
      return parts[2]
    return None

  @property
  def rank(self) -> int:
    if self.name == SRC:
      return -1
    layer = self.layer
    return LAYERS.get(layer, PUBLIC) if layer else PUBLIC


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def all_module_names() -> set[str]:
  return {module_name(p) for p in PACKAGE_DIR.rglob("*.py")}


def _is_type_checking(test) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
  )


def read(path: pathlib.Path, known: set[str]) -> Module:
  source = path.read_text()
  tree = ast.parse(source, str(path))
  name = module_name(path)
  comments = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string
  imports = []

  def visit(node, deferred, type_only):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        visit(child, True, type_only)
      elif isinstance(child, ast.If) and _is_type_checking(child.test):
        for stmt in child.body:
          visit_stmt(stmt, deferred, True)
        for stmt in child.orelse:
          visit_stmt(stmt, deferred, type_only)
      elif isinstance(child, (ast.Import, ast.ImportFrom)):
        record(child, deferred, type_only)
      else:
        visit(child, deferred, type_only)

  def visit_stmt(stmt, deferred, type_only):
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
      record(stmt, deferred, type_only)
    else:
      visit(stmt, deferred, type_only)

  def record(node, deferred, type_only):
    targets, names = [], []
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "named_embed":
          targets.append(alias.name)
    else:
      base = node.module or ""
      if node.level:  # relative: resolve against this package
        package = name.split(".")
        if not path.name == "__init__.py":
          package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
      if base.split(".")[0] != "named_embed":
        return
      for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in known:
          targets.append(full)
        else:
          names.append((base, alias.name))
          if base in known:
            targets.append(base)
    text = ast.get_source_segment(source, node) or ""
    imports.append(
      Import(
        name,
        str(path.relative_to(ROOT)),
        node.lineno,
        " ".join(text.split()),
        tuple(dict.fromkeys(targets)),
        tuple(names),
        deferred,
        type_only,
      )
    )

  visit(tree, False, False)
  return Module(name, path, tree, source, imports, comments)


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
  known = all_module_names()
  return {
    module_name(p): read(p, known) for p in sorted(PACKAGE_DIR.rglob("*.py"))
  }


def _src_modules(modules):
  return {n: m for n, m in modules.items() if n.startswith(SRC + ".")}


def _fail(title: str, problems: list[str]):
  if problems:
    pytest.fail(
      f"{title} ({len(problems)}):\n  " + "\n  ".join(sorted(problems)),
      pytrace=False,
    )


# ------------------------------------------------------------------ tests


def test_the_package_is_in_layers(modules):
  src = PACKAGE_DIR / "_src"
  assert src.is_dir(), (
    "named_embed/_src does not exist: the package is not in its layered"
    " layout yet (see docs/architecture.md)"
  )
  found = {p.name for p in src.iterdir() if (p / "__init__.py").is_file()}
  assert found == set(LAYERS), (
    f"the layers on disk {sorted(found)} differ from LAYERS {sorted(LAYERS)}"
    " in tests/architecture_test.py: place a new layer in the table"
  )
  loose = sorted(
    m.rel
    for n, m in _src_modules(modules).items()
    if n.count(".") == 2 and not m.path.name == "__init__.py"
  )
  assert not loose, f"modules outside every layer: {loose}"


def test_no_import_circle(modules):
  graph = collections.defaultdict(dict)  # module -> {target: Import}
  for m in modules.values():
    for imp in m.imports:
      if imp.deferred or imp.type_only:
        continue
      for target in imp.targets:
        if target != m.name and target in modules:
          graph[m.name].setdefault(target, imp)
  cycles = _cycles(graph)
  problems = []
  for cycle in cycles:
    steps = []
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):
      imp = graph[a][b]
      steps.append(f"{imp.path}:{imp.line}: `{imp.text}`")
    problems.append(
      " -> ".join(cycle + cycle[:1]) + "\n    " + "\n    ".join(steps)
    )
  _fail("import circles (module-level imports)", problems)


def _cycles(graph) -> list[list[str]]:
  """One cycle through each strongly connected component (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, {}):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(_one_cycle(graph, set(component), min(component)))

  for v in sorted(graph):
    if v not in index:
      strong(v)
  return out


def _one_cycle(graph, component, start) -> list[str]:
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph.get(v, {})):
        if w == start:
          path, u = [], v
          while u is not None:
            path.append(u)
            u = parent[u]
          return list(reversed(path))
        if w in component and w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  return [start]


def test_layers_import_only_their_own_or_lower_layers(modules):
  problems = []
  for m in _src_modules(modules).values():
    for imp in m.imports:
      if imp.deferred or imp.type_only:
        continue
      for target in imp.targets:
        if target not in modules:
          continue
        t = modules[target]
        if t.rank > m.rank:
          where = t.layer or "the public front"
          problems.append(
            f"{imp.path}:{imp.line}: `{imp.text}`: {m.layer} imports"
            f" {target} ({where}), a higher layer"
          )
  _fail("upward imports at module level", problems)


def test_the_demo_uses_only_the_public_api(modules):
  problems = []
  for m in modules.values():
    if not m.name.startswith("named_embed.demo"):
      continue
    for imp in m.imports:
      for target in imp.targets:
        if target.startswith(SRC) or (
          target != "named_embed"
          and not target.startswith("named_embed.demo")
          and target not in ("named_embed.formats", "named_embed.sharding")
        ):
          problems.append(f"{imp.path}:{imp.line}: `{imp.text}`")
  _fail("the demo imports past the public API", problems)


def test_deferred_imports_say_why(modules):
  problems = []
  for m in modules.values():
    for imp in m.imports:
      if not imp.deferred or not imp.targets:
        continue
      if imp.line in m.comment_lines:
        continue
      above = imp.line - 1
      lines = m.source.splitlines()
      if above >= 1 and lines[above - 1].strip().startswith("#"):
        continue
      problems.append(
        f"{imp.path}:{imp.line}: `{imp.text}` has no comment saying why it"
        " is deferred"
      )
  _fail("deferred imports without a reason", problems)


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_private_names_of_another(modules):
  known = set(modules)
  problems = []
  for m in modules.values():
    bound_modules = {}  # local name -> module it is bound to
    for imp in m.imports:
      for base, name in imp.names:
        if _private(name):
          problems.append(
            f"{imp.path}:{imp.line}: `{imp.text}` imports the private"
            f" `{name}` of {base}"
          )
    for node in ast.walk(m.tree):
      if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          if full in known:
            bound_modules[alias.asname or alias.name] = full
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.asname and alias.name in known:
            bound_modules[alias.asname] = alias.name
    for node in ast.walk(m.tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in bound_modules
        and _private(node.attr)
        and bound_modules[node.value.id] != m.name
      ):
        problems.append(
          f"{m.rel}:{node.lineno}: `{node.value.id}.{node.attr}` reads the"
          f" private `{node.attr}` of {bound_modules[node.value.id]}"
        )
  _fail("private names used across modules", problems)


def _outside_tables(modules):
  for m in modules.values():
    if m.layer != TABLE_LAYER:
      yield m


def _class_name(node) -> str | None:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return node.attr
  return None


def _classes_in(node) -> set[str]:
  """The class names of an isinstance classinfo: a name, a tuple, a | b."""
  if isinstance(node, ast.Tuple):
    return set().union(*(_classes_in(e) for e in node.elts))
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
    return _classes_in(node.left) | _classes_in(node.right)
  name = _class_name(node)
  return {name} if name else set()


def test_no_hasattr_dispatch_outside_the_table_layer(modules):
  problems = []
  for m in _outside_tables(modules):
    if m.name in DUCK_TYPING:
      continue
    for node in ast.walk(m.tree):
      if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "hasattr"
      ):
        continue
      attr = node.args[1] if len(node.args) > 1 else None
      if isinstance(attr, ast.Constant) and attr.value in ARRAY_PROTOCOL:
        continue
      text = ast.get_source_segment(m.source, node)
      problems.append(f"{m.rel}:{node.lineno}: `{text}`")
  _fail(
    f"hasattr probing outside _src/{TABLE_LAYER} (ask the table contract"
    " instead)",
    problems,
  )


def test_no_kind_checks_outside_the_table_layer(modules):
  problems = []
  for m in _outside_tables(modules):
    for node in ast.walk(m.tree):
      text = None
      if isinstance(node, ast.Compare) and len(node.ops) == 1:
        op = node.ops[0]
        left, right = node.left, node.comparators[0]
        if isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq)):
          for a, b in ((left, right), (right, left)):
            if (
              isinstance(a, ast.Call)
              and isinstance(a.func, ast.Name)
              and a.func.id == "type"
              and _class_name(b) in TABLE_CLASSES
            ):
              text = ast.get_source_segment(m.source, node)
      elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("isinstance", "issubclass")
        and len(node.args) == 2
        and _classes_in(node.args[1]) & OTHER_KINDS
      ):
        text = ast.get_source_segment(m.source, node)
      if text:
        problems.append(f"{m.rel}:{node.lineno}: `{' '.join(text.split())}`")
  _fail(
    f"checks of the kind of table outside _src/{TABLE_LAYER}",
    problems,
  )

"""The tour notebook: it runs, prints what it promises, and matches its .py.

``examples/tour.ipynb`` is paired with ``examples/tour.py`` (jupytext's
percent format). The notebook is executed here with nbclient in a fresh
kernel of the current interpreter, and its printed losses, shapes,
neighbours and sizes are checked against what the tour says. The pairing is
checked without jupytext: the cells read from the .py must be the
notebook's cells. After editing ``tour.py``, rewrite and re-execute the
notebook (outputs included, for the documentation site) with::

  python tests/notebook_test.py --write
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import subprocess
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "tour.py"
NOTEBOOK = ROOT / "examples" / "tour.ipynb"
CELL_TIMEOUT_SECONDS = 120  # a loaded CI machine compiles slowly
RUN_TIMEOUT_SECONDS = 300
KINDS = {
  "number": ["one", "two", "three"],
  "colour": ["red", "green", "blue", "grey"],
  "animal": ["cat", "dog", "cow", "owl"],
}
# The mean over positions of log(size of the next word's kind).
BEST_LOSS = sum(math.log(len(words)) for words in KINDS.values()) / 3

_MARKER = re.compile(r"^# %%(?P<rest>.*)$")


def script_cells(text: str) -> list[tuple[str, str]]:
  """The ``(cell_type, source)`` cells of a percent-format script.

  The jupytext header (a ``# ---`` ... ``# ---`` comment block) is left
  out. A cell starts at a ``# %%`` line (``# %% [markdown]`` for markdown,
  whose lines lose their ``# `` prefix); blank lines around a cell's source
  are dropped, as jupytext does.

  >>> script_cells("# %%\\nx = 1\\n\\n# %% [markdown]\\n# Hi\\n#\\n# there\\n")
  [('code', 'x = 1'), ('markdown', 'Hi\\n\\nthere')]
  """
  lines = text.splitlines()
  if lines and lines[0] == "# ---":
    end = lines.index("# ---", 1)
    lines = lines[end + 1 :]
  cells: list[tuple[str, list[str]]] = []
  for number, line in enumerate(lines, start=1):
    marker = _MARKER.match(line)
    if marker:
      rest = marker["rest"].strip()
      if rest not in ("", "[markdown]"):
        raise ValueError(f"{SCRIPT}: unknown cell marker {line!r}.")
      cells.append(("markdown" if rest else "code", []))
    elif cells:
      kind, body = cells[-1]
      if kind == "markdown" and line.strip():
        if not line.startswith("# ") and line != "#":
          raise ValueError(
            f"{SCRIPT}: line {number} of a markdown cell does not start"
            f" with '# ': {line!r}."
          )
        line = line[2:]
      elif kind == "markdown":
        line = ""
      body.append(line.rstrip() if kind == "markdown" else line)
    elif line.strip():
      raise ValueError(f"{SCRIPT}: line {number} is before the first cell.")
  return [(kind, "\n".join(body).strip("\n")) for kind, body in cells]


def notebook_cells(notebook) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source) for cell in notebook.cells]


def build_notebook() -> nbformat.NotebookNode:
  """A notebook of the cells of ``tour.py``, with the pairing metadata."""
  notebook = nbformat.v4.new_notebook()
  new_cell = {
    "code": nbformat.v4.new_code_cell,
    "markdown": nbformat.v4.new_markdown_cell,
  }
  for kind, source in script_cells(SCRIPT.read_text(encoding="utf-8")):
    cell = new_cell[kind](source)
    del cell["id"]  # nbformat 4.4: no random ids, no churn on each write
    notebook.cells.append(cell)
  notebook.nbformat_minor = 4
  notebook.metadata = {
    "jupytext": {"formats": "ipynb,py:percent"},
    "kernelspec": {
      "display_name": "Python 3",
      "language": "python",
      "name": "python3",
    },
  }
  return notebook


def execute(notebook, directory: pathlib.Path) -> nbformat.NotebookNode:
  """Runs ``notebook`` in place in a kernel of this interpreter.

  The kernel spec is written to ``directory`` (no installed ``python3``
  spec is needed, and none pointing at another interpreter is used); the
  checkout comes first on the kernel's path and ``directory`` is its
  working directory.
  """
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient

  spec_dir = directory / "kernels" / "named-embed-tour"
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher"]
    + ["-f", "{connection_file}"],
    "display_name": "named_embed tour",
    "language": "python",
    "env": {"PYTHONPATH": str(ROOT)},
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
  specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])
  manager = KernelManager(
    kernel_name=spec_dir.name,
    kernel_spec_manager=specs,
    # Local sockets in ``directory``: no TCP port, no warning about one.
    transport="ipc",
    ip=str(directory / "kernel"),
  )
  client = NotebookClient(
    notebook,
    km=manager,
    timeout=CELL_TIMEOUT_SECONDS,
    record_timing=False,
    resources={"metadata": {"path": str(directory)}},
  )
  client.execute()
  return notebook


def printed(cell) -> str:
  """What a code cell printed on stdout."""
  return "".join(
    output.text
    for output in cell.get("outputs", [])
    if output.output_type == "stream" and output.name == "stdout"
  )


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> nbformat.NotebookNode:
  # In a process of its own: the kernel's sockets and their warnings stay
  # out of this one (the suite turns every warning into an error).
  directory = tmp_path_factory.mktemp("tour")
  output = directory / "executed.ipynb"
  result = subprocess.run(
    [sys.executable, __file__, "--run", str(output)],
    cwd=directory,
    capture_output=True,
    text=True,
    timeout=RUN_TIMEOUT_SECONDS,
    check=False,
  )
  assert result.returncode == 0, (
    f"Running {NOTEBOOK.name} failed ({result.returncode}):\n"
    f"{result.stdout}\n{result.stderr}"
  )
  return nbformat.read(output, as_version=4)


@pytest.fixture(scope="module")
def stdout(executed) -> str:
  return "".join(printed(cell) for cell in executed.cells)


def test_notebook_is_its_script():
  committed = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(committed)
  from_script = script_cells(SCRIPT.read_text(encoding="utf-8"))
  in_notebook = notebook_cells(committed)
  for number, (a, b) in enumerate(zip(from_script, in_notebook), start=1):
    assert a == b, (
      f"Cell {number} differs between {SCRIPT.name} and {NOTEBOOK.name}:"
      f"\n{a}\n--- against ---\n{b}\nRun `python tests/notebook_test.py"
      " --write` after editing tour.py."
    )
  assert len(from_script) == len(in_notebook), (
    f"{SCRIPT.name} has {len(from_script)} cells, {NOTEBOOK.name}"
    f" {len(in_notebook)}: run `python tests/notebook_test.py --write`."
  )
  assert committed.metadata["jupytext"]["formats"] == "ipynb,py:percent"


def test_script_cells_reads_the_jupytext_header_and_markdown():
  text = (
    "# ---\n# jupyter:\n#   x: 1\n# ---\n\n# %% [markdown]\n# # T\n\n# %%\na\n"
  )
  assert script_cells(text) == [("markdown", "# T"), ("code", "a")]
  with pytest.raises(ValueError, match="does not start with '# '"):
    script_cells("# %% [markdown]\nnot a comment\n")
  with pytest.raises(ValueError, match="unknown cell marker"):
    script_cells("# %% [raw]\nx\n")


def test_notebook_runs_without_errors_or_warnings(executed):
  for number, cell in enumerate(executed.cells, start=1):
    for output in cell.get("outputs", []):
      assert output.output_type != "error", (
        f"cell {number} raised {output.ename}: {output.evalue}"
      )
      assert output.get("name") != "stderr", (
        f"cell {number} wrote to stderr: {output.text}"
      )


def test_committed_notebook_shows_its_outputs(executed):
  # The site renders the committed notebook as it is: every cell that
  # prints when run shows what it printed, in as many lines.
  committed = nbformat.read(NOTEBOOK, as_version=4)
  for number, (ran, kept) in enumerate(
    zip(executed.cells, committed.cells), start=1
  ):
    assert printed(ran).count("\n") == printed(kept).count("\n"), (
      f"cell {number} of {NOTEBOOK.name} does not show its current output:"
      " run `python tests/notebook_test.py --write`."
    )
    assert not [o for o in kept.get("outputs", []) if o.output_type == "error"]


def test_losses_fall_to_the_best_possible(stdout):
  losses = [float(x) for x in re.findall(r"step +\d+ +loss (\d+\.\d+)", stdout)]
  assert len(losses) == 6, stdout
  # Random rows: about log(vocabulary size) = log(12); trained: the entropy
  # of the grammar, which no model beats on average.
  assert losses[0] > BEST_LOSS + 1.0, losses
  assert abs(losses[-1] - BEST_LOSS) < 0.15, (losses, BEST_LOSS)
  assert f"(best possible {BEST_LOSS:.3f})" in stdout


def test_shapes_and_parameters(stdout):
  assert "{'batch': 1, 'seq': 3, 'embedding': 8}" in stdout
  assert "['embed.embeddings', 'mlp_in.weights', 'mlp_out.weights']" in stdout
  assert "14 {'batch': 1, 'seq': 3, 'vocabulary': 14}" in stdout
  assert "[12, 13]" in stdout  # the added words follow the old ids


def test_sentences_follow_the_grammar(stdout):
  kind_of = {word: kind for kind, words in KINDS.items() for word in words}
  order = list(KINDS)
  lines = [
    line.split()
    for line in stdout.splitlines()
    if line.split() and all(word in kind_of for word in line.split())
  ]
  assert len(lines) == 2, stdout
  for words in lines:
    kinds = [order.index(kind_of[word]) for word in words]
    assert all((b - a) % 3 == 1 for a, b in zip(kinds, kinds[1:])), words


def test_nearest_words_are_of_the_same_kind(stdout):
  found = re.findall(r"^(\w+) -> \[(.*?)\] \(cosine (.*)\)$", stdout, re.M)
  assert len(found) == 3, stdout
  for word, neighbours, scores in found:
    (kind,) = [k for k, words in KINDS.items() if word in words]
    names = [name.strip(" '") for name in neighbours.split(",")]
    assert len(names) == 2 and word not in names, names
    assert set(names) <= set(KINDS[kind]), (word, names)
    cosines = [float(s) for s in scores.split(",")]
    assert cosines == sorted(cosines, reverse=True) and cosines[-1] > 0.5


def test_int8_table_is_smaller_and_as_good(stdout):
  # 12 rows x 8 float32 values; int8: one byte a value, one float32 a row.
  assert f"{12 * 8 * 4} bytes as float32, {12 * 8 + 12 * 4} as int8" in stdout
  (pair,) = re.findall(r"float32 (\d+\.\d+), int8 (\d+\.\d+)", stdout)
  assert abs(float(pair[0]) - float(pair[1])) < 0.01, pair


def main(argv: list[str]) -> None:
  """``--write``: rewrites and re-executes the notebook from ``tour.py``;
  ``--run OUT``: executes the committed notebook and writes it to OUT."""
  import tempfile

  if argv == ["--write"]:
    notebook, output = build_notebook(), NOTEBOOK
  elif len(argv) == 2 and argv[0] == "--run":
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    output = pathlib.Path(argv[1])
  else:
    raise SystemExit(
      f"usage: python {pathlib.Path(__file__).name} --write | --run OUT"
    )
  with tempfile.TemporaryDirectory() as directory:
    execute(notebook, pathlib.Path(directory))
  nbformat.validate(notebook)
  nbformat.write(notebook, output)
  print(f"wrote {output}")


if __name__ == "__main__":
  main(sys.argv[1:])

"""Build hooks of the documentation site (``mkdocs.yml`` loads this file).

- `DoctestBlocks`, a griffe extension: our docstrings are Google style with
  unindented ``>>>`` examples, which markdown would read as nested
  quotations. Each run of doctest lines (from a ``>>>`` line to the next
  blank line) becomes a fenced ``pycon`` block, without its doctest flags.
- `on_files`, a mkdocs hook: the tour notebook lives in ``examples/`` (next
  to its paired ``tour.py``) and is added to the site as ``tour.ipynb``,
  which mkdocs-jupyter renders.
"""

from __future__ import annotations

import pathlib
import re

import griffe
import mkdocs.plugins
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "tour.ipynb"
_FLAGS = re.compile(r"\s*#\s*doctest:.*$")


def fence_doctests(text: str) -> str:
  """``text`` with each run of doctest lines inside a ``pycon`` fence.

  A run starts at a line whose first characters (after its indentation) are
  ``>>>`` and ends before the next blank line; lines inside existing fences
  are left alone.

  >>> print(fence_doctests("Example:\\n\\n>>> 1 + 1\\n2\\n\\nDone."))
  Example:
  <BLANKLINE>
  ```pycon
  >>> 1 + 1
  2
  ```
  <BLANKLINE>
  Done.
  """
  lines = text.splitlines()
  out = []
  in_fence = False
  i = 0
  while i < len(lines):
    line = lines[i]
    stripped = line.lstrip()
    if stripped.startswith("```"):
      in_fence = not in_fence
    if in_fence or not stripped.startswith(">>>"):
      out.append(line)
      i += 1
      continue
    indent = line[: len(line) - len(stripped)]
    out.append(f"{indent}```pycon")
    while i < len(lines) and lines[i].strip():
      out.append(_FLAGS.sub("", lines[i]))
      i += 1
    out.append(f"{indent}```")
  return "\n".join(out)


class DoctestBlocks(griffe.Extension):
  """Fences the ``>>>`` examples of every docstring (see `fence_doctests`)."""

  def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
    if obj.docstring is not None:
      obj.docstring.value = fence_doctests(obj.docstring.value)


@mkdocs.plugins.event_priority(100)  # before mkdocs-jupyter sees the files
def on_files(files, config):
  """Adds ``examples/tour.ipynb`` to the site as ``tour.ipynb``."""
  # A plain File (not File.generated): mkdocs-jupyter's wrapper reads the
  # source path from the file's src_dir.
  files.append(
    File(
      NOTEBOOK.name,
      src_dir=str(NOTEBOOK.parent),
      dest_dir=config.site_dir,
      use_directory_urls=config.use_directory_urls,
    )
  )
  return files

"""Runs the Python examples of the user documentation.

For each ``docs/*.md`` file, every fenced ```python block is executed in
order, in one namespace per file, so a block can use the names defined by
the blocks above it. Other blocks (```bash, ```text, ...) are not run.
Examples that show an error catch it themselves, so every block must run
without raising.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import textwrap

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^`]*)$")


@dataclasses.dataclass(frozen=True)
class CodeBlock:
  """One fenced code block of a markdown file."""

  language: str
  line: int  # 1-based line of the first line of code
  source: str


def code_blocks(text: str) -> list[CodeBlock]:
  """The fenced code blocks of ``text``, in order.

  A block opens with three or more backticks and an optional info string
  (its first word is the language) and closes with a line of at least as
  many backticks and no info string. Indented blocks (inside list items)
  are dedented.
  """
  blocks = []
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    opening = _FENCE.match(lines[i])
    if not opening:
      i += 1
      continue
    ticks = opening["ticks"]
    info = opening["info"].strip()
    language = info.split()[0].lower() if info else ""
    body = []
    j = i + 1
    while j < len(lines):
      closing = _FENCE.match(lines[j])
      if (
        closing
        and not closing["info"].strip()
        and len(closing["ticks"]) >= len(ticks)
      ):
        break
      body.append(lines[j])
      j += 1
    else:
      raise ValueError(f"Unclosed code block opened on line {i + 1}.")
    blocks.append(CodeBlock(language, i + 2, textwrap.dedent("\n".join(body))))
    i = j + 1
  return blocks


def python_blocks(path: pathlib.Path) -> list[CodeBlock]:
  """The ```python (or ```py) blocks of the markdown file at ``path``."""
  return [
    block
    for block in code_blocks(path.read_text(encoding="utf-8"))
    if block.language in ("python", "py")
  ]


def test_docs_exist():
  assert DOC_FILES, f"No markdown files found in {DOCS}."


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: path.name)
def test_python_blocks_run(path: pathlib.Path):
  blocks = python_blocks(path)
  namespace = {"__name__": f"docs.{path.stem}"}
  for number, block in enumerate(blocks, start=1):
    # Pad with newlines so that tracebacks give line numbers in the .md file.
    source = "\n" * (block.line - 1) + block.source
    try:
      code = compile(source, str(path), "exec")
      exec(code, namespace)
    except Exception as error:
      raise AssertionError(
        f"{path.name}: python block {number} of {len(blocks)} (starting on"
        f" line {block.line}) raised {type(error).__name__}: {error}"
      ) from error


def test_code_blocks_parser():
  text = textwrap.dedent(
    """\
    Intro.

    ```python
    x = 1
    ```

    - item

      ```py
      y = x + 1
      ```

    ````text
    ```python
    not code
    ```
    ````

    ```bash
    pip install named_embed
    ```
    """
  )
  blocks = code_blocks(text)
  assert [(b.language, b.line, b.source) for b in blocks] == [
    ("python", 4, "x = 1"),
    ("py", 10, "y = x + 1"),
    ("text", 14, "```python\nnot code\n```"),
    ("bash", 20, "pip install named_embed"),
  ]

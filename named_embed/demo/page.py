"""The HTML page of the trained embedding table, rendered with treescope."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import treescope

import named_embed as ne
from named_embed.demo.text import CharVocabulary


def nearest_chars(
  table: ne.EmbeddingTable, vocab: CharVocabulary, char: str, k: int = 3
) -> list[str]:
  """The ``k`` characters whose rows are closest to ``char``'s (cosine).

  Example:

  >>> table = ne.EmbeddingTable.from_pretrained(np.array(
  ...     [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], np.float32))
  >>> nearest_chars(table, CharVocabulary(("a", "b", "c")), "a", k=2)
  ['b', 'c']
  """
  rows = np.asarray(table.rows_array(), np.float64).reshape(len(vocab), -1)
  norms = np.linalg.norm(rows, axis=1, keepdims=True)
  unit = rows / np.maximum(norms, 1e-12)
  index = vocab.chars.index(char)
  similarity = unit @ unit[index]
  similarity[index] = -np.inf
  order = np.argsort(-similarity, kind="stable")[:k]
  return [vocab.chars[int(i)] for i in order]


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
td, th {{ padding: 0 0.8em; font-family: monospace; }}
pre {{ background: #f4f4f4; padding: 0.5em; white-space: pre-wrap; }}</style>
</head><body>
<h1>{title}</h1>
{summary}
<h2>The trained embedding table</h2>
<p>One row per character (axis <code>vocabulary</code>), one column per
component (axis <code>embedding</code>). Hover over a cell to see its
character and value.</p>
{array}
<h2>The table as a penzai struct</h2>
{struct}
<h2>The whole model</h2>
<p>The <code>EmbeddingLookup</code> and the <code>EmbeddingDecode</code> hold
the same <code>EmbeddingTable</code>, hence one embedding parameter.</p>
{model}
<h2>Nearest characters (cosine similarity of rows)</h2>
<table><tr><th>row</th><th>character</th><th>nearest</th></tr>
{neighbours}
</table>
</body></html>
"""


def render_page(
  table: ne.EmbeddingTable,
  vocab: CharVocabulary,
  summary: Sequence[str] = (),
  model: Any = None,
) -> str:
  """An HTML page showing ``table`` with treescope.

  The page holds `treescope.render_array` of the table, its rows labelled
  with their characters, the treescope rendering of the `EmbeddingTable`
  struct (and of the whole model, if given), and each character's nearest
  neighbours.

  Args:
    table: A table whose vocabulary has ``len(vocab)`` rows.
    vocab: The characters of the rows.
    summary: Lines of text shown at the top (escaped).
    model: If given, rendered with treescope too.

  Returns:
    The HTML source.

  Example:

  >>> table = ne.EmbeddingTable.from_pretrained(np.eye(2, dtype=np.float32))
  >>> page = render_page(table, CharVocabulary(("x", "y")), ["hello"])
  >>> "treescope" in page, "&quot;x&quot;" in page, "<pre>hello</pre>" in page
  (True, True, True)
  """
  labels = vocab.labels()
  figure = treescope.render_array(
    table.value,
    rows=[table.vocabulary_axis],
    columns=list(table.embedding_axes),
    axis_item_labels={table.vocabulary_axis: labels},
  )
  neighbours = "\n".join(
    f"<tr><td>{i}</td><td>{html.escape(label)}</td>"
    f"<td>{html.escape(' '.join(nearest_chars(table, vocab, char)))}</td></tr>"
    for i, (char, label) in enumerate(zip(vocab.chars, labels))
  )
  return _PAGE.format(
    title="named_embed demo: a tied character embedding table",
    summary="".join(f"<pre>{html.escape(line)}</pre>" for line in summary),
    array=treescope.render_to_html(figure, compressed=False),
    struct=treescope.render_to_html(table, compressed=False),
    model="" if model is None else treescope.render_to_html(model),
    neighbours=neighbours,
  )


def write_page(page: str, output: str | os.PathLike[str]) -> str:
  """Writes ``page`` to ``output`` (UTF-8) and returns its absolute path.

  >>> import pathlib, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = write_page("<p>hi</p>", pathlib.Path(tmp) / "page.html")
  ...   print(os.path.isabs(path), pathlib.Path(path).read_text())
  True <p>hi</p>
  """
  path = os.path.abspath(os.fspath(output))
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path

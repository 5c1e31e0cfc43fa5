"""Rendering a table: a treescope summary line and a standalone HTML page.

`EmbeddingTable.__treescope_repr__` adds `summarize`'s line (vocabulary
size, axes, dtype, padding row, row-norm statistics) to penzai's usual
struct rendering; `show` writes a page with the table's treescope view and
its array, rows labelled by token.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import treescope

from named_embed import _norms, _table_arrays
from named_embed.table import EmbeddingTable


def show(
  table: EmbeddingTable,
  path: str | os.PathLike[str],
  *,
  title: str | None = None,
  max_cells: int = 100_000,
  notes: Sequence[str] = (),
) -> str:
  """Writes a standalone HTML page of ``table`` and returns its absolute path.

  The page shows the summary line, then ``notes``, then the treescope
  rendering of the table, whose embedding array is drawn with its rows
  labelled by token (by id without a vocabulary): hovering a cell shows its
  token. For a `QuantizedTable`, `LoraTable` or `TrainableRowsTable` the
  labelled array is drawn after the structure: the rows as lookups read
  them (dequantised, adapters added), built once for the page.

  Args:
    table: The table to show (bound, with concrete values).
    path: Where to write the page (UTF-8).
    title: Page title; default ``"EmbeddingTable"``.
    max_cells: Larger arrays are drawn truncated to about this many cells.
    notes: Extra paragraphs of plain text shown under the summary, in order
      (e.g. how the table was trained, or its nearest neighbours). They are
      HTML-escaped, and their line breaks and spacing are kept. A single
      string is one note.

  Returns:
    The absolute path of the page.

  Example:

  >>> import pathlib, tempfile, numpy as np, named_embed as ne
  >>> from named_embed import rendering
  >>> table = ne.EmbeddingTable.from_pretrained(np.eye(2, dtype=np.float32))
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   page = pathlib.Path(rendering.show(table, pathlib.Path(tmp, "t.html")))
  ...   page.is_absolute(), "treescope" in page.read_text()
  (True, True)

  With notes (escaped, so they cannot inject markup):

  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   text = pathlib.Path(rendering.show(
  ...       table, pathlib.Path(tmp, "t.html"),
  ...       notes=["trained 3 steps", "a < b"])).read_text()
  >>> '<pre class="note">trained 3 steps</pre>' in text, "a &lt; b" in text
  (True, True)
  """
  plain = isinstance(table, EmbeddingTable)
  value = table.value if plain else _rows_as_read(table)
  figure = treescope.render_array(
    value,
    rows=[table.vocabulary_axis],
    columns=list(table.embedding_axes),
    axis_item_labels={table.vocabulary_axis: row_labels(table)},
    truncate=math.prod(value.named_shape.values()) > max_cells,
    maximum_size=max_cells,
    cutoff_size_per_axis=max_cells,
    pixels_per_cell=max(7, min(21, 300 // max(value.named_shape.values()))),
  )

  def autovisualizer(node: Any, _path: Any) -> Any:
    if node is value:
      return treescope.IPythonVisualization(figure, replace=False)
    return None

  with treescope.active_autovisualizer.set_scoped(autovisualizer):
    body = treescope.render_to_html(table, compressed=False)
  if not plain:  # the float rows are not in the tree: draw them after it
    body += "\n<p>The rows as read (dequantised, adapters added):</p>\n"
    body += treescope.render_to_html(figure, compressed=False)
  title = html.escape(title or "EmbeddingTable")
  page = _PAGE.format(
    title=title,
    summary=html.escape(summarize(table)),
    notes="".join(
      f'<pre class="note">{html.escape(note)}</pre>\n'
      for note in ([notes] if isinstance(notes, str) else notes)
    ),
    body=body,
  )
  path = os.path.abspath(os.fspath(path))
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path


def _rows_as_read(table: Any) -> Any:
  """The float rows of a compressed or adapted table, as a NamedArray."""
  if hasattr(table, "dequantized"):
    return table.dequantized().value
  return table.merged().value


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }}
pre.note {{ white-space: pre-wrap; background: #f4f4f4; padding: 0.5em; }}
</style></head>
<body><h1>{title}</h1><p><code>{summary}</code></p>
{notes}<p>Hover over a cell of the array to see its token and value.</p>
{body}
</body></html>
"""


def row_labels(table: EmbeddingTable) -> list[str]:
  """Labels of the rows: their tokens, or ``"id i"`` without a vocabulary.

  A token that is empty or has white space at either end (``" "``,
  ``"\\n"``, ``" the"``) is shown as its Python repr, so it stays visible.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed import rendering
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((2, 1), np.float32),
  ...                                           padding_index=0)
  >>> rendering.row_labels(table)
  ['id 0 (padding)', 'id 1']
  >>> rendering.row_labels(table.with_vocabulary(ne.Vocabulary(["a", " "])))
  ['a (padding)', "' '"]
  """
  if table.vocabulary is None:
    labels = [f"id {i}" for i in range(table.vocab_size)]
  else:
    labels = [
      repr(token) if token.strip() != token or not token else token
      for token in table.vocabulary.tokens
    ]
  if table.padding_index is not None:
    labels[table.padding_index] += " (padding)"
  return labels


# ------------------------------------------------------------------ summary


def summarize(table: EmbeddingTable, statistics: bool = True) -> str:
  """The one-line summary shown by treescope: shape, dtype, padding, norms.

  Row-norm statistics need concrete values: they are left out for traced
  or unbound tables, or when ``statistics`` is False.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed import rendering
  >>> print(rendering.summarize(ne.EmbeddingTable.from_pretrained(
  ...     np.array([[0, 0], [3, 4]], np.float32), padding_index=0)))
  vocabulary:2 × embedding:2 float32, padding row 0,
  row norms min 0 mean 2.5 max 5

  A `QuantizedTable`, `LoraTable` or `TrainableRowsTable` gives its own
  line (its ``summary()``): the scheme and bytes, the adapters, the
  trained rows, then the base's line.
  """
  if not isinstance(table, EmbeddingTable) and hasattr(table, "summary"):
    return table.summary(statistics)
  value = _table_arrays.value_or_none(table.embeddings)
  padding = "no padding row"
  if table.padding_index is not None:
    padding = f"padding row {table.padding_index}"
    if table.vocabulary is not None:
      padding += f" {table.vocabulary.token(table.padding_index)!r}"
  if value is None:
    kind = type(table.embeddings).__name__
    label = getattr(table.embeddings, "label", None)
    return f"unbound {kind} {label!r}, {padding}"
  shape = " × ".join(f"{n}:{s}" for n, s in value.named_shape.items())
  parts = [f"{shape} {np.dtype(value.dtype).name}", padding]
  if table.true_vocab_size is not None:
    extra = value.named_shape[table.vocabulary_axis] - table.true_vocab_size
    rows = "alignment row" if extra == 1 else "alignment rows"
    parts.append(f"{table.true_vocab_size} tokens + {extra} {rows}")
  data = getattr(value, "data_array", None)
  concrete = isinstance(data, np.ndarray) or (
    isinstance(data, jax.Array)
    and not isinstance(data, jax.core.Tracer)
    and not data.is_deleted()
  )
  if statistics and concrete:
    norms = np.asarray(_norms.row_norms(table.token_rows(), 2.0, 1))
    parts.append(
      f"row norms min {norms.min():.3g} mean {norms.mean():.3g}"
      f" max {norms.max():.3g}"
    )
  return ", ".join(parts)


def treescope_repr(
  table: EmbeddingTable, path: str | None, subtree_renderer: Any
) -> Any:
  """penzai's rendering of a struct, plus the `summarize` line as a comment.

  The comment shows when the node is expanded, so ``repr(table)`` (one
  line) is unchanged. Used by ``EmbeddingTable.__treescope_repr__``.

  >>> import numpy as np, treescope, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((2, 1), np.float32))
  >>> print(treescope.render_to_text(table).splitlines()[0])
  EmbeddingTable(  # vocabulary:2 × embedding:1 float32, no padding row,
  row norms min 1 mean 1 max 1
  """
  from penzai.core._treescope_handlers import struct_handler
  from treescope import formatting_util, lowering, rendering_parts

  def comment(statistics: bool) -> Any:
    text = "  # " + summarize(table, statistics)
    return rendering_parts.comment_color(rendering_parts.text(text))

  fields = dataclasses.fields(table)
  color, pattern = formatting_util.parse_simple_color_and_pattern_spec(
    table.treescope_color(), type(table).__name__
  )
  children = rendering_parts.build_field_children(
    table,
    path,
    _without_addresses(subtree_renderer),
    fields_or_attribute_names=fields,
    attr_style_fn=struct_handler.struct_attr_style_fn_for_fields(fields),
  )
  return rendering_parts.build_foldable_tree_node_from_children(
    prefix=struct_handler.render_struct_constructor(table),
    children=children,
    suffix=")",
    path=path,
    background_color=color,
    background_pattern=pattern,
    first_line_annotation=lowering.maybe_defer_rendering(
      main_thunk=lambda _: comment(True),
      placeholder_thunk=lambda: comment(False),
    ),
  )


def _without_addresses(subtree_renderer: Any) -> Any:
  """Renders a `Vocabulary` by its repr, without the ``object at 0x..``."""
  from treescope import rendering_parts

  from named_embed.vocabulary import Vocabulary

  def render(node: Any, path: str | None = None) -> Any:
    if isinstance(node, Vocabulary) and not hasattr(node, "__treescope_repr__"):
      return rendering_parts.build_one_line_tree_node(
        rendering_parts.abbreviation_color(rendering_parts.text(repr(node))),
        path=path,
      )
    return subtree_renderer(node, path=path)

  return render

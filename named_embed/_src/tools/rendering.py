"""Rendering a table: a treescope summary line and a standalone HTML page.

Every kind of table's ``__treescope_repr__`` adds its summary line (its
``summary()``, via `summarize`: axes, dtype, padding row, and, for a float
table, row-norm statistics) to penzai's usual struct rendering; `show`
writes a page with the table's rows as lookups read them, labelled by
token, and its treescope view. When treescope draws arrays (in a
notebook), a table's own arrays along its vocabulary axis are drawn the
same way, a row a token (`named_embed._src.tools.token_rows`). Nothing here
asks which kind a table is: what differs comes from the table
(``summary()``, ``row_parts()``).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import treescope
from jax import lax
from penzai import pz

from named_embed._src.base import norms as _norms
from named_embed._src.base.vocabulary import Vocabulary
from named_embed._src.rows import row_source, table_arrays
from named_embed._src.tables.contract import AbstractTable, check_table
from named_embed._src.tools import row_scan, token_rows


def show(
  table: AbstractTable,
  path: str | os.PathLike[str],
  *,
  title: str | None = None,
  max_cells: int = 100_000,
  notes: Sequence[str] = (),
) -> str:
  """Writes a standalone HTML page of ``table`` and returns its absolute path.

  The page shows the summary line, then ``notes``, then the table's rows
  as lookups read them (a float table's rows; a quantised table's
  dequantised, an adapted table's merged), drawn with treescope, rows
  labelled by token (by id without a vocabulary): hovering a cell shows
  its token. Then the table's structure. Any kind of table, on any layout:
  the rows are copied to the host one chunk at a time (as in
  `named_embed._src.tools.row_scan.host_rows`), and the page holds them as floats.

  Args:
    table: The table to show (bound, with concrete values).
    path: Where to write the page (UTF-8).
    title: Page title; default the table's class name.
    max_cells: Larger arrays are drawn truncated to about this many cells.
    notes: Extra paragraphs of plain text shown under the summary, in order
      (e.g. how the table was trained, or its nearest neighbours). They are
      HTML-escaped, and their line breaks and spacing are kept. A single
      string is one note.

  Returns:
    The absolute path of the page.

  Raises:
    TypeError: if ``table`` is not a named_embed table.

  Example:

  >>> import pathlib, tempfile, numpy as np, named_embed as ne
  >>> from named_embed._src.tools import rendering
  >>> table = ne.EmbeddingTable.from_pretrained(np.eye(2, dtype=np.float32))
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   page = pathlib.Path(rendering.show(table, pathlib.Path(tmp, "t.html")))
  ...   page.is_absolute(), "treescope" in page.read_text()
  (True, True)

  With notes (escaped, so they cannot inject markup), of a quantised table:

  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   text = pathlib.Path(rendering.show(
  ...       table.quantized(), pathlib.Path(tmp, "t.html"),
  ...       notes=["trained 3 steps", "a < b"])).read_text()
  >>> '<pre class="note">trained 3 steps</pre>' in text, "a &lt; b" in text
  (True, True)
  """
  check_table(table, "ne.show")
  value = _rows_as_read(table)
  figure = treescope.render_array(
    value,
    rows=[table.vocabulary_axis],
    columns=list(table.embedding_axes),
    axis_item_labels={table.vocabulary_axis: axis_labels(table)},
    truncate=math.prod(value.named_shape.values()) > max_cells,
    maximum_size=max_cells,
    cutoff_size_per_axis=max_cells,
    pixels_per_cell=max(7, min(21, 300 // max(value.named_shape.values()))),
  )
  spot = _FigureSpot()

  def autovisualizer(node: Any, _path: Any) -> Any:
    if node is spot:  # the figure, drawn as itself (not as a Python object)
      return treescope.IPythonVisualization(figure, replace=True)
    return None  # no array of the tree is drawn: the rows are drawn above

  with treescope.active_autovisualizer.set_scoped(autovisualizer):
    rows = treescope.render_to_html(spot, compressed=False)
    tree = treescope.render_to_html(table, compressed=False)
  title = html.escape(title or type(table).__name__)
  page = _PAGE.format(
    title=title,
    summary=html.escape(summarize(table)),
    notes="".join(
      f'<pre class="note">{html.escape(note)}</pre>\n'
      for note in ([notes] if isinstance(notes, str) else notes)
    ),
    rows=rows,
    tree=tree,
  )
  path = os.path.abspath(os.fspath(path))
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path


class _FigureSpot:
  """Where `show` draws its figure (replaced by it when rendered)."""


def _rows_as_read(table: AbstractTable) -> pz.nx.NamedArray:
  """Every row of the table as lookups read it (alignment rows too), as a
  NamedArray on the host's CPU device (treescope reads jax arrays)."""
  rows = row_scan.host_rows(table, table.num_rows)
  rows = jax.device_put(rows, jax.local_devices(backend="cpu")[0])
  return pz.nx.wrap(rows, table.vocabulary_axis, *table.embedding_axes)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }}
pre.note {{ white-space: pre-wrap; background: #f4f4f4; padding: 0.5em; }}
</style></head>
<body><h1>{title}</h1><p><code>{summary}</code></p>
{notes}<p>The rows as read by lookups (a quantised table's dequantised, an
adapted table's with its adapters added). Hover over a cell to see its token
and value.</p>
{rows}
<p>The table:</p>
{tree}
</body></html>
"""


def row_labels(table: AbstractTable) -> list[str]:
  """Labels of the rows: their tokens, or ``"id i"`` without a vocabulary.

  A token that is empty or has white space at either end (``" "``,
  ``"\\n"``, ``" the"``) is shown as its Python repr, so it stays visible.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import rendering
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


def summarize(table: AbstractTable, statistics: bool = True) -> str:
  """The one-line summary shown by treescope: ``table.summary(statistics)``.

  Every kind of table writes its own line. A float `EmbeddingTable`'s
  gives its axes, dtype, pad token row, alignment rows and row-norm
  statistics of its token rows (`row_norm_statistics`); a `QuantizedTable`'s
  its scheme, groups and bytes, without norm statistics (it skips them);
  a `LoraTable`'s or `TrainableRowsTable`'s its adapters or trained rows,
  then its base's line (for a float base, with the *base's* norms).
  Statistics need concrete values: they are left out for traced or unbound
  tables, or when ``statistics`` is False.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import rendering
  >>> print(rendering.summarize(ne.EmbeddingTable.from_pretrained(
  ...     np.array([[0, 0], [3, 4]], np.float32), padding_index=0)))
  vocabulary:2 × embedding:2 float32, padding row 0,
  row norms min 0 mean 2.5 max 5

  Raises:
    TypeError: if ``table`` is not a named_embed table.
  """
  return check_table(table, "ne.summarize").summary(statistics)


def embedding_table_summary(table: Any, statistics: bool = True) -> str:
  """The summary line of a float `EmbeddingTable` (its ``summary()``).

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import rendering
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32))
  >>> rendering.embedding_table_summary(table.padded_to_multiple(4), False)
  'vocabulary:4 × embedding:2 float32, no padding row, 3 tokens + 1 alignment row'
  """
  value = table_arrays.value_or_none(table.embeddings)
  padding = _padding_words(table)
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
  norms = row_norm_statistics(table) if statistics else None
  if norms is not None:
    low, mean, high = norms
    parts.append(f"row norms min {low:.3g} mean {mean:.3g} max {high:.3g}")
  return ", ".join(parts)


def _padding_words(table: Any) -> str:
  if table.padding_index is None:
    return "no padding row"
  words = f"padding row {table.padding_index}"
  if table.vocabulary is not None:
    words += f" {table.vocabulary.token(table.padding_index)!r}"
  return words


def row_norm_statistics(
  table: AbstractTable,
) -> tuple[float, float, float] | None:
  """``(min, mean, max)`` of the L2 norms of the token rows as lookups read
  them (alignment rows left out, the pad token row kept), or None when the
  table is unbound or traced. Any kind and layout: one jitted kernel reads
  the rows chunk by chunk, each device its own (dequantised or merged one
  chunk at a time).

  >>> import numpy as np, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.array([[0, 0], [3, 4]], np.float32)).padded_to_multiple(4)
  >>> ne.row_norm_statistics(table.quantized())
  (0.0, 2.5, 5.0)

  Raises:
    TypeError: if ``table`` is not a named_embed table (penzai's own
      ``pz.nn.EmbeddingTable`` included: the message says how to convert it).
  """
  check_table(table, "ne.row_norm_statistics")
  try:
    source, arrays = table.row_parts()
  except ValueError:  # unbound parameters
    return None
  if not row_scan.is_concrete(arrays):
    return None
  chunk = row_scan.chunk_rows(source, source.num_rows)
  low, total, high = _norm_statistics(
    arrays, source, table.rows_sharding, table.vocab_size, chunk
  )
  return float(low), float(total) / table.vocab_size, float(high)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _norm_statistics(arrays, source, rows_sharding, vocab_size, chunk):
  arrays = row_source.prepare(source, arrays, rows_sharding)

  def body(reader, offset, axis):
    dtype = _norms.accumulation_dtype(source.dtype)

    def step(carry, start, size):
      low, total, high = carry
      norms = _norms.row_norms(reader.rows(start, size), 2.0, 1)
      ids = offset + start + jnp.arange(size)
      token = ids < vocab_size
      big = jnp.asarray(jnp.inf, dtype)
      low = jnp.minimum(low, jnp.min(jnp.where(token, norms, big)))
      high = jnp.maximum(high, jnp.max(jnp.where(token, norms, -big)))
      return low, total + jnp.sum(jnp.where(token, norms, 0)), high

    start = (
      jnp.asarray(jnp.inf, dtype),
      jnp.zeros((), dtype),
      jnp.asarray(-jnp.inf, dtype),
    )
    rows = reader.num_rows
    low, total, high = row_scan.fold_chunks(step, start, rows, min(chunk, rows))
    if axis is not None:
      low, total, high = (
        lax.pmin(low, axis),
        lax.psum(total, axis),
        lax.pmax(high, axis),
      )
    return low, total, high

  return row_scan.over_shards(body, source, arrays, rows_sharding)


def treescope_repr(
  table: AbstractTable, path: str | None, subtree_renderer: Any
) -> Any:
  """penzai's rendering of a struct, plus the `summarize` line as a comment.

  The comment shows when the node is expanded, so ``repr(table)`` (one
  line) is unchanged. Used by every kind's ``__treescope_repr__``. When
  treescope draws arrays (an active autovisualizer, as after
  ``treescope.basic_interactive_setup(autovisualize_arrays=True)``), each
  array of the table along its vocabulary axis (a plain table's rows, a
  quantised table's codes and scales, LoRA's ``A``) is drawn as `show`
  draws the rows: one row a token, labelled by it (`row_labels`).

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
    token_rows.with_token_rows(
      _without_addresses(subtree_renderer),
      table.vocabulary_axis,
      functools.partial(_rows_and_labels, table),
    ),
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

  def render(node: Any, path: str | None = None) -> Any:
    if isinstance(node, Vocabulary):
      return rendering_parts.build_one_line_tree_node(
        rendering_parts.abbreviation_color(rendering_parts.text(repr(node))),
        path=path,
      )
    return subtree_renderer(node, path=path)

  return render


def axis_labels(table: AbstractTable) -> list[str]:
  """`row_labels` for every row, alignment rows included (``"alignment
  row i"``): the labels of a table's vocabulary axis.

  >>> import numpy as np, named_embed as ne
  >>> from named_embed._src.tools import rendering
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 1), np.float32))
  >>> rendering.axis_labels(table.padded_to_multiple(4))
  ['id 0', 'id 1', 'id 2', 'alignment row 3']
  """
  labels = row_labels(table)
  extra = range(table.vocab_size, table.num_rows)
  return labels + [f"alignment row {i}" for i in extra]


def _rows_and_labels(table: AbstractTable) -> tuple[int, Any] | None:
  """The number of rows and how to label them, or None when unbound."""
  try:
    num_rows = table.num_rows
  except ValueError:  # an unbound parameter: no rows to draw
    return None
  return num_rows, functools.partial(axis_labels, table)

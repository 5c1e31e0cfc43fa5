"""Drawing a table's arrays in treescope with a row a token.

When treescope draws arrays (an active autovisualizer, as in a notebook
after ``treescope.basic_interactive_setup(autovisualize_arrays=True)``), a
table's ``__treescope_repr__`` (`named_embed._src.tools.rendering`)
renders its fields through `with_token_rows`: every array the
autovisualizer would draw that has the table's vocabulary axis (all of
its rows) is drawn instead as `named_embed.show` draws rows, with the
vocabulary axis down the page and each row labelled by its token. Other
arrays and values render as they would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import treescope
from penzai import pz

Labels = Callable[[], list[str]]


def with_token_rows(
  subtree_renderer: Any,
  vocabulary_axis: str,
  rows_and_labels: Callable[[], tuple[int, Labels] | None],
) -> Any:
  """``subtree_renderer``, drawing arrays along ``vocabulary_axis`` a row a
  token whenever the active autovisualizer draws arrays.

  ``rows_and_labels()`` gives the table's number of rows and a function
  making their labels (called only when an array is drawn), or None for a
  table without rows (unbound): then nothing changes.

  >>> import numpy as np, treescope, named_embed as ne
  >>> table = ne.EmbeddingTable.from_pretrained(np.ones((3, 2), np.float32)
  ...     ).with_vocabulary(ne.Vocabulary(["a", "b", "c"]))
  >>> with treescope.active_autovisualizer.set_scoped(
  ...     treescope.ArrayAutovisualizer()):
  ...   page = treescope.render_to_html(table, compressed=False)
  >>> '"a", "b", "c"' in page
  True
  """

  def render(node: Any, path: str | None = None) -> Any:
    active = treescope.active_autovisualizer.get()
    found = None if active is None else rows_and_labels()
    if found is None:
      return subtree_renderer(node, path=path)
    num_rows, labels = found
    rows = TokenRows(active, vocabulary_axis, num_rows, labels)
    with treescope.active_autovisualizer.set_scoped(rows):
      return subtree_renderer(node, path=path)

  return render


@dataclasses.dataclass(frozen=True, eq=False)
class TokenRows:
  """An autovisualizer: ``inner``, except that an array ``inner`` draws
  which has all ``num_rows`` rows of ``axis`` is drawn with that axis as
  rows, labelled by ``labels()``.

  >>> import numpy as np, treescope
  >>> from penzai import pz
  >>> from named_embed._src.tools import token_rows
  >>> rows = token_rows.TokenRows(treescope.ArrayAutovisualizer(), "v", 2,
  ...                             lambda: ["x", "y"])
  >>> array = pz.nx.wrap(np.ones((2, 3), np.float32)).tag("v", "e")
  >>> type(rows(array, None)).__name__, rows("text", None)
  ('VisualizationFromTreescopePart', None)
  """

  inner: Any
  axis: str
  num_rows: int
  labels: Labels

  def __call__(self, value: Any, path: str | None) -> Any:
    drawn = self.inner(value, path)
    if not (
      isinstance(value, pz.nx.NamedArrayBase)
      and value.named_shape.get(self.axis) == self.num_rows
      and not value.positional_shape
      and isinstance(
        drawn,
        (
          treescope.VisualizationFromTreescopePart,
          treescope.IPythonVisualization,
        ),
      )
    ):
      return drawn
    return treescope.VisualizationFromTreescopePart(self._part(value, path))

  def _part(self, value: Any, path: str | None) -> Any:
    """The array drawn a row a token, in a foldable node like treescope's
    own (its summary, the figure), rendered when treescope asks."""
    from treescope import lowering, rendering_parts, type_registries

    adapter = type_registries.lookup_ndarray_adapter(value)
    settings = self.inner
    if not isinstance(settings, treescope.ArrayAutovisualizer):
      settings = treescope.ArrayAutovisualizer()

    def summary(fast: bool) -> Any:
      return rendering_parts.siblings(
        rendering_parts.text("<"), adapter.get_array_summary(value, fast=fast)
      )

    def draw(expand_state: Any) -> Any:
      figure = treescope.render_array(
        value,
        rows=[self.axis],
        columns=[n for n in value.named_shape if n != self.axis],
        axis_item_labels={self.axis: self.labels()},
        truncate=True,
        maximum_size=settings.maximum_size,
        cutoff_size_per_axis=settings.cutoff_size_per_axis,
        minimum_edge_items=settings.edge_items,
        around_zero=settings.around_zero,
        pixels_per_cell=settings.pixels_per_cell,
      )
      expanded = rendering_parts.indented_children([figure.treescope_part])
      return rendering_parts.build_custom_foldable_tree_node(
        label=rendering_parts.abbreviation_color(summary(False)),
        contents=rendering_parts.siblings(
          rendering_parts.fold_condition(expanded=expanded),
          rendering_parts.abbreviation_color(rendering_parts.text(">")),
        ),
        path=path,
        expand_state=expand_state
        or rendering_parts.ExpandState.WEAKLY_EXPANDED,
      ).renderable

    def placeholder() -> Any:
      text = rendering_parts.siblings(summary(True), rendering_parts.text(">"))
      return rendering_parts.deferred_placeholder_style(text)

    return rendering_parts.RenderableAndLineAnnotations(
      renderable=lowering.maybe_defer_rendering(
        draw, placeholder, expanded_newlines_for_layout=8
      ),
      annotations=rendering_parts.build_copy_button(path),
    )

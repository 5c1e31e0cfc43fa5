"""`show()` in a real browser: hovering a row of the array shows its token.

The page of the ``python -m named_embed`` demo (written by `show`) is checked
the same way: its table is drawn, and its rows are labelled by character.

Runs Debian's Chromium (``/usr/bin/chromium``, installed by ``.ci/run``)
through Playwright; Playwright's own browser downloads are never used.
Without Chromium or Playwright the tests skip and say why, unless
``NAMED_EMBED_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure
(see ``tests/browser.py``).
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
from browser import chromium

import named_embed as ne

TOKENS = ["<pad>", "king", "queen", "man", "woman", "apple"]
EMBEDDING = 4
DEMO_SCREENSHOT = "/tmp/demo_page.png"


def make_page(tmp_path: pathlib.Path) -> str:
  rng = np.random.default_rng(0)
  table = ne.EmbeddingTable.from_pretrained(
    rng.normal(size=(len(TOKENS), EMBEDDING)).astype(np.float32)
  ).with_vocabulary(ne.Vocabulary(TOKENS, pad="<pad>"))
  return ne.show(table, tmp_path / "table.html")


def test_hovering_a_row_shows_its_token(tmp_path):
  url = pathlib.Path(make_page(tmp_path)).as_uri()
  with chromium() as browser:
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(url)
    # treescope draws each array into a canvas inside its shadow root,
    # then removes the "Rendering array..." placeholder.
    canvas = page.locator(".arrayviz_container canvas")
    canvas.wait_for(state="visible")
    loading = page.locator(".arrayviz_container .loading_message")
    loading.wait_for(state="detached")
    box = canvas.bounding_box()
    tip = page.locator(".arrayviz_container .hovertip")
    # The canvas has a one-cell border around the rows and columns.
    rows, columns = len(TOKENS) + 2, EMBEDDING + 2
    for row in (2, 0, 5):
      page.mouse.move(
        box["x"] + 2.5 / columns * box["width"],
        box["y"] + (row + 1.5) / rows * box["height"],
      )
      tip.wait_for(state="visible")
      text = tip.text_content()
      label = TOKENS[row] + (" (padding)" if row == 0 else "")
      assert f"vocabulary @ {row}: {label}" in text, text
      assert f"'vocabulary':{row}, 'embedding':1" in text, text
    assert not errors, errors


def wait_for_arrays(page):
  """Waits until treescope has drawn its array canvas; returns it."""
  # treescope draws each array into a canvas inside its shadow root,
  # then removes the "Rendering array..." placeholder.
  canvas = page.locator(".arrayviz_container canvas")
  canvas.wait_for(state="visible")
  page.locator(".arrayviz_container .loading_message").wait_for(
    state="detached"
  )
  return canvas


def test_demo_page_draws_the_table_with_character_rows(tmp_path):
  from named_embed import demo

  result = demo.run(
    steps=3,
    output=tmp_path / "demo.html",
    stream=io.StringIO(),
    progress=io.StringIO(),
  )
  chars = result["vocabulary"].tokens
  table = result["model"].sublayers[0].table
  (embedding,) = table.embedding_axes.values()
  url = pathlib.Path(result["output"]).as_uri()
  with chromium() as browser:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(url)
    canvas = wait_for_arrays(page)
    assert page.locator(".arrayviz_container").count() >= 1
    body = page.locator("body").inner_text()
    assert "TreescopeFigure(" not in body
    assert "nearest rows" in body and "sample (temperature" in body
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box["width"] > 100 and box["height"] > 100, box
    tip = page.locator(".arrayviz_container .hovertip")
    # The canvas has a one-cell border around the rows and columns.
    rows, columns = len(chars) + 2, embedding + 2
    for char in ("a", "T", ","):
      row = chars.index(char)
      page.mouse.move(
        box["x"] + 2.5 / columns * box["width"],
        box["y"] + (row + 1.5) / rows * box["height"],
      )
      tip.wait_for(state="visible")
      text = tip.text_content()
      assert f"vocabulary @ {row}: {char}" in text, text
    page.mouse.move(0, 0)
    page.screenshot(path=DEMO_SCREENSHOT, full_page=True)
    assert not errors, errors


# ------------------------------------------- the inline view of every kind


def inline_kinds():
  """Every kind of table, and how many of its arrays lead with the
  vocabulary (each drawn with a row a token)."""
  import jax

  rng = np.random.default_rng(0)
  table = ne.EmbeddingTable.from_pretrained(
    rng.normal(size=(len(TOKENS), EMBEDDING)).astype(np.float32),
    freeze=False,
  ).with_vocabulary(ne.Vocabulary(TOKENS, pad="<pad>"))
  lora = table.with_lora(2, name="l", init_base_rng=jax.random.key(0))
  return {
    "trainable": (table, 1),
    "int8": (table.quantized("int8"), 2),  # codes and scales
    "lora": (lora, 2),  # the base's rows and A (B has no vocabulary axis)
    "rows": (table.with_trainable_rows(["king"], name="r"), 1),
    "aligned": (table.padded_to_multiple(4), 1),
  }


def inline_page(tmp_path, name, table) -> str:
  """The notebook view: treescope's HTML with arrays drawn (every node
  expanded, as a click on each would)."""
  import treescope
  from treescope import layout_algorithms

  def expand_all(tree):
    layout_algorithms.expand_to_depth(tree, 10)

  with (
    treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer()),
    treescope.active_expansion_strategy.set_scoped(expand_all),
  ):
    body = treescope.render_to_html(table, compressed=False)
  path = tmp_path / f"{name}.html"
  path.write_text(
    f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{body}"
    "</body></html>",
    encoding="utf-8",
  )
  return path.as_uri()


def test_the_inline_view_of_every_kind_labels_rows_by_token(tmp_path):
  kinds = inline_kinds()
  urls = {
    name: inline_page(tmp_path, name, t) for name, (t, _) in kinds.items()
  }
  with chromium() as browser:
    page = browser.new_page(viewport={"width": 1280, "height": 2000})
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    for name, (table, labelled) in kinds.items():
      page.goto(urls[name])
      canvases = wait_for_every_array(page)
      assert canvases.count() >= labelled, name
      assert labelled == sum(
        hover_labels(page, canvases, i, table.num_rows)
        for i in range(canvases.count())
      ), name
    assert not errors, errors


def wait_for_every_array(page):
  """Waits until treescope has drawn every array's canvas; returns them."""
  canvases = page.locator(".arrayviz_container canvas")
  canvases.first.wait_for(state="visible")
  loading = page.locator(".arrayviz_container .loading_message")
  for _ in range(200):
    if loading.count() == 0:
      return canvases
    page.wait_for_timeout(50)
  raise AssertionError(f"{loading.count()} arrays still loading after 10 s")


def hover_labels(page, canvases, i, num_rows) -> bool:
  """Whether canvas ``i`` draws ``num_rows`` rows (treescope's 7-pixel
  cells, a one-cell border around them), each labelled by its token: its
  hover tips read ``vocabulary @ row: token`` (alignment rows say so)."""
  canvas = canvases.nth(i)
  canvas.scroll_into_view_if_needed()
  box = canvas.bounding_box()
  if round(box["height"] / 7) != num_rows + 2:
    return False  # not a row a token (LoRA's B, the trained rows)
  tips = []
  for row in (1, 2, num_rows - 1):
    page.mouse.move(box["x"] + 1.5 * 7, box["y"] + (row + 1.5) * 7)
    tip = page.locator(".arrayviz_container .hovertip").nth(i)
    tip.wait_for(state="visible", timeout=5000)
    tips.append(tip.text_content())
  page.mouse.move(0, 0)
  last = num_rows - 1
  label = TOKENS[last] if last < len(TOKENS) else f"alignment row {last}"
  for row, token, tip in zip((1, 2, last), ("king", "queen", label), tips):
    assert f"vocabulary @ {row}: {token}" in tip, tips
  return True

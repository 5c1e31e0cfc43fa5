"""`show()` in a real browser: hovering a row of the array shows its token.

The page of the ``python -m named_embed`` demo (written by `show`) is checked
the same way: its table is drawn, and its rows are labelled by character.

Runs Debian's Chromium (``/usr/bin/chromium``, installed by ``.ci/run``)
through Playwright; Playwright's own browser downloads are never used. A
missing browser or Playwright fails the test: it is not skipped.
"""

from __future__ import annotations

import io
import os
import pathlib

import numpy as np
import pytest

import named_embed as ne

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
]
TOKENS = ["<pad>", "king", "queen", "man", "woman", "apple"]
EMBEDDING = 4
DEMO_SCREENSHOT = "/tmp/demo_page.png"


def sync_playwright():
  if not os.path.exists(CHROMIUM):
    pytest.fail(
      f"{CHROMIUM} is missing: this test needs Debian's Chromium. Install it"
      " with `apt-get update && apt-get install -y chromium` (.ci/run does"
      " so when it is missing); never `playwright install`."
    )
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    pytest.fail(
      'The `playwright` package is missing: `python -m pip install ".[test]"`.'
    )
  return sync_playwright()


def make_page(tmp_path: pathlib.Path) -> str:
  rng = np.random.default_rng(0)
  table = ne.EmbeddingTable.from_pretrained(
    rng.normal(size=(len(TOKENS), EMBEDDING)).astype(np.float32)
  ).with_vocabulary(ne.Vocabulary(TOKENS, pad="<pad>"))
  return ne.show(table, tmp_path / "table.html")


def test_hovering_a_row_shows_its_token(tmp_path):
  url = pathlib.Path(make_page(tmp_path)).as_uri()
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(
      executable_path=CHROMIUM, args=CHROMIUM_ARGS
    )
    try:
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
    finally:
      browser.close()


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
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(
      executable_path=CHROMIUM, args=CHROMIUM_ARGS
    )
    try:
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
    finally:
      browser.close()

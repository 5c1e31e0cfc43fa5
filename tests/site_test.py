"""The documentation site: ``mkdocs build --strict``, then read in Chromium.

The build fails on any warning: a broken link or anchor, a page left out
of the nav, a docstring argument that is not in the signature. The built
site must have an API entry (a heading with its anchor) for every public
name, read from ``named_embed.__all__`` and the ``__all__`` of each public
module, so a new name without an entry fails here. In Chromium (see
``tests/browser.py``; skipped without one unless required), every page
renders, the search finds ``decode_cross_entropy``, and every entry is a
visible heading.
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import importlib
import importlib.util
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import threading
import time
import types
import urllib.parse

import browser
import pytest

import named_embed

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_SECONDS = 300
# Modules of the package that are not API: no reference page, no entries.
NOT_API = {
  "demo": "the program behind `python -m named_embed` (see its --help)",
}
_HEADING = re.compile(
  r'<h(?P<level>[1-6]) id="(?P<id>[^"]+)" class="doc doc-heading"'
)


def public_modules() -> dict[str, types.ModuleType]:
  """``named_embed`` and its public submodules, by name."""
  names = ["named_embed"] + [
    f"named_embed.{info.name}"
    for info in pkgutil.iter_modules(named_embed.__path__)
    if not info.name.startswith("_") and info.name not in NOT_API
  ]
  return {name: importlib.import_module(name) for name in names}


def public_names() -> dict[str, set[str]]:
  """Each public name (``module.name``) and the anchors that document it.

  An object public in several modules (``named_embed.save`` is
  ``named_embed.formats.save``) is documented once, under any of them; a
  module is documented under its own name.
  """
  modules = public_modules()
  paths: dict[int, set[str]] = {}
  for module_name, module in modules.items():
    paths.setdefault(id(module), set()).add(module_name)
    for name in module.__all__:
      paths.setdefault(id(getattr(module, name)), set()).add(
        f"{module_name}.{name}"
      )
  entries = {name: paths[id(module)] for name, module in modules.items()}
  for module_name, module in modules.items():
    for name in module.__all__:
      entries[f"{module_name}.{name}"] = paths[id(getattr(module, name))]
  return entries


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp("site")
  start = time.perf_counter()
  result = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict"]
    + ["--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(directory)],
    cwd=ROOT,
    env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    capture_output=True,
    text=True,
    timeout=BUILD_TIMEOUT_SECONDS,
    check=False,
  )
  seconds = time.perf_counter() - start
  assert result.returncode == 0, (
    f"`mkdocs build --strict` failed ({result.returncode}) after"
    f" {seconds:.1f} s:\n{result.stdout}\n{result.stderr}"
  )
  print(f"mkdocs build --strict: {seconds:.1f} s")
  return directory


@pytest.fixture(scope="module")
def headings(site) -> dict[str, str]:
  """Every API heading of the reference pages: anchor -> page path."""
  found = {}
  for page in sorted((site / "reference").rglob("index.html")):
    relative = page.parent.relative_to(site).as_posix() + "/"
    for match in _HEADING.finditer(page.read_text(encoding="utf-8")):
      anchor = html.unescape(match["id"])
      assert anchor not in found, f"{anchor} is documented twice"
      found[anchor] = relative
  return found


def site_pages(site: pathlib.Path) -> list[str]:
  """The paths of the site's pages (``""`` for the home page)."""
  pages = []
  for page in sorted(site.rglob("index.html")):
    relative = page.parent.relative_to(site).as_posix()
    if relative.split("/")[0] not in ("assets", "search"):
      pages.append("" if relative == "." else relative + "/")
  return pages


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, format, *args):
    pass


@contextlib.contextmanager
def serve(directory: pathlib.Path):
  """The site over http on a free local port (the search needs a worker,
  which a ``file://`` page cannot start); yields the base URL."""
  handler = functools.partial(_QuietHandler, directory=str(directory))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_port}/"
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


# ------------------------------------------------------------ no browser


def test_public_modules_are_found_by_themselves():
  # What the reference must cover: a new public module is found by itself.
  assert {
    "named_embed",
    "named_embed.formats",
    "named_embed.sharding",
  } <= set(public_modules())
  assert "named_embed.demo" not in public_modules()


def test_every_public_name_has_an_api_entry(headings):
  missing = {
    name: sorted(anchors)
    for name, anchors in public_names().items()
    if not anchors & set(headings)
  }
  assert not missing, (
    "Public names without an entry in the API reference: give each a"
    " docstring (an undocumented name is not rendered), and add"
    " `::: <module>.<name>` to a page of docs/reference/ (a page with"
    f" `::: <module>` for a new module): {missing}"
  )


def test_reference_documents_no_private_path(headings):
  private = [anchor for anchor in headings if "._" in anchor]
  assert not private, private


def test_every_page_is_built(site):
  pages = set(site_pages(site))
  for name in ("", "guide/", "tour/", "reference/", "reference/formats/"):
    assert name in pages, sorted(pages)
  for markdown in (ROOT / "docs").glob("*.md"):
    page = "" if markdown.stem == "index" else f"{markdown.stem}/"
    assert page in pages, f"{markdown.name} has no page in the site"


def test_the_tour_page_shows_the_notebook_and_its_outputs(site):
  text = (site / "tour" / "index.html").read_text(encoding="utf-8")
  assert "A tour of named_embed" in text
  assert "decode_cross_entropy" in text
  assert re.search(r"step +149 +loss \d\.\d{3}", text), "no training output"


def load_hooks():
  """``docs/hooks.py``, the build hooks ``mkdocs.yml`` loads."""
  spec = importlib.util.spec_from_file_location(
    "named_embed_docs_hooks", ROOT / "docs" / "hooks.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_doctests_become_fenced_blocks():
  fence = load_hooks().fence_doctests
  text = (
    "Summary.\n\nArgs:\n  x: A number.\n\n    >>> f(1)  # doctest: +SKIP\n"
    "    2\n\nExample:\n\n>>> f(\n...   2)\n3\n>>> g()\n\nAfter.\n"
    "```python\n>>> inside_a_fence()\n```"
  )
  assert fence(text).splitlines() == [
    "Summary.",
    "",
    "Args:",
    "  x: A number.",
    "",
    "    ```pycon",
    "    >>> f(1)",
    "    2",
    "    ```",
    "",
    "Example:",
    "",
    "```pycon",
    ">>> f(",
    "...   2)",
    "3",
    ">>> g()",
    "```",
    "",
    "After.",
    "```python",
    ">>> inside_a_fence()",
    "```",
  ]


def test_rendered_examples_are_code_not_quotes(site):
  # Unfenced, markdown would read each ">>>" line as three nested quotes.
  page = (site / "reference" / "operations" / "index.html").read_text(
    encoding="utf-8"
  )
  assert "<blockquote>" not in page
  entry = page[page.index('id="named_embed.decode_cross_entropy"') :]
  # Highlighted as a console session: ">>> " is a prompt.
  prompt = '<span class="gp">&gt;&gt;&gt; </span>'
  end = entry.find("doc-heading", 100)  # the next entry, if any
  assert prompt in entry[: end if end > 0 else None], (
    "the example of decode_cross_entropy is not a pycon block"
  )


# ------------------------------------------------------------ in Chromium


def local_page(chromium, base: str):
  """A new page that loads nothing but the site (the site works offline);
  ``page.external`` lists what it tried to load from elsewhere."""
  page = chromium.new_page()
  page.external = []

  def route(request_route):
    url = request_route.request.url
    if url.startswith(base) or url.startswith("data:"):
      request_route.continue_()
    else:
      page.external.append(url)
      request_route.abort()

  page.route("**/*", route)
  return page


@pytest.fixture(scope="module")
def site_url(site):
  with serve(site) as url:
    yield url


@pytest.fixture(scope="module")
def chromium():
  with browser.chromium() as launched:
    yield launched


# What a page shows: its title, the length of its text, its navigation, and
# the API headings that are drawn (id and text).
_READ_PAGE = """() => {
  const article = document.querySelector("article");
  const title = document.querySelector("article h1");
  const drawn = (e) => e.getClientRects().length > 0
    && getComputedStyle(e).visibility !== "hidden";
  return {
    title: title && drawn(title) ? title.innerText.trim() : "",
    text: article ? article.innerText.length : 0,
    navigation: document.querySelectorAll("nav.md-nav--primary").length,
    headings: Array.from(document.querySelectorAll(".doc-heading[id]"))
      .filter(drawn).map((h) => [h.id, h.innerText]),
  };
}"""


@pytest.fixture(scope="module")
def rendered(site, site_url, chromium) -> dict:
  """Every page of the site, loaded once in Chromium and read."""
  page = local_page(chromium, site_url)
  errors = []
  page.on("pageerror", lambda error: errors.append(error))
  pages = {}
  for path in site_pages(site):
    response = page.goto(site_url + path)
    assert response.ok, (path, response.status)
    page.locator("article h1").first.wait_for(state="visible")
    pages[path] = page.evaluate(_READ_PAGE)
  page.close()
  return {"pages": pages, "errors": errors, "external": page.external}


def test_every_page_renders(rendered):
  for path, shown in rendered["pages"].items():
    assert shown["title"], f"{path or 'home'}: no title drawn"
    assert shown["text"] > 200, f"{path or 'home'}: almost no text"
    assert shown["navigation"] == 1, f"{path or 'home'}: no navigation"
  assert not rendered["errors"], rendered["errors"]
  assert not rendered["external"], rendered["external"]


def test_every_public_name_is_a_visible_heading(rendered, headings):
  drawn = {
    anchor: (path, text)
    for path, shown in rendered["pages"].items()
    for anchor, text in shown["headings"]
  }
  for name, anchors in public_names().items():
    shown = [drawn[anchor] for anchor in sorted(anchors) if anchor in drawn]
    assert shown, f"{name}: no heading drawn (entries: {sorted(anchors)})"
    path, text = shown[0]
    assert name.rsplit(".", 1)[-1] in text, (name, path, text)
  assert set(drawn) == set(headings), set(drawn) ^ set(headings)


def test_search_finds_decode_cross_entropy(site_url, chromium):
  page = local_page(chromium, site_url)
  page.goto(site_url)
  page.locator("label.md-search__icon, .md-search__input").first.click()
  search = page.locator("input.md-search__input")
  search.fill("decode_cross_entropy")
  results = page.locator(".md-search-result__item a")
  results.first.wait_for(state="visible", timeout=15_000)
  anchor = "named_embed.decode_cross_entropy"
  found = [
    urllib.parse.urlsplit(href)
    for href in results.evaluate_all("links => links.map((a) => a.href)")
  ]
  entries = [
    url
    for url in found
    if url.path.endswith("/reference/operations/") and url.fragment == anchor
  ]
  assert entries, [url.geturl() for url in found]
  page.goto(entries[0].geturl())
  heading = page.locator(f'[id="{anchor}"]')
  heading.wait_for(state="visible")
  assert "decode_cross_entropy" in heading.inner_text()
  assert not page.external, page.external


# ---------------------------------------------------- skipping, failing


def test_a_missing_browser_skips_unless_required(monkeypatch):
  monkeypatch.setattr(browser, "chromium_path", lambda: None)
  monkeypatch.delenv(browser.REQUIRE_VARIABLE, raising=False)
  with pytest.raises(pytest.skip.Exception, match="Chromium is not installed"):
    browser.require_browser()
  monkeypatch.setenv(browser.REQUIRE_VARIABLE, "1")
  with pytest.raises(pytest.fail.Exception, match="makes this a failure"):
    browser.require_browser()


def test_missing_playwright_skips_unless_required(monkeypatch):
  monkeypatch.setattr(browser, "playwright_installed", lambda: False)
  monkeypatch.setenv(browser.REQUIRE_VARIABLE, "0")
  with pytest.raises(pytest.skip.Exception, match="`playwright` package"):
    browser.require_browser()
  monkeypatch.setenv(browser.REQUIRE_VARIABLE, "1")
  with pytest.raises(pytest.fail.Exception, match="`playwright` package"):
    browser.require_browser()

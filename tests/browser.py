"""Chromium for the browser tests, through Playwright, never downloaded.

The tests drive Debian's Chromium (``/usr/bin/chromium``, or ``chromium``
on the path). On a machine without it, or without the ``playwright``
package, a browser test is skipped and says why, so the README's test
command passes wherever Python runs. ``.ci/run`` installs Chromium and sets
``NAMED_EMBED_REQUIRE_BROWSER=1``, which turns a missing browser into a
failure: CI never skips these tests silently.

  from browser import chromium

  def test_page(tmp_path):
    with chromium() as browser:
      page = browser.new_page()
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator

import pytest

REQUIRE_VARIABLE = "NAMED_EMBED_REQUIRE_BROWSER"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
]


def chromium_path() -> str | None:
  """The Chromium to drive: ``/usr/bin/chromium``, else ``chromium``."""
  if os.path.exists(DEFAULT_CHROMIUM):
    return DEFAULT_CHROMIUM
  return shutil.which("chromium")


def playwright_installed() -> bool:
  """Whether the ``playwright`` package can be imported."""
  return importlib.util.find_spec("playwright") is not None


def browser_required(environ=os.environ) -> bool:
  """Whether a missing browser fails (``NAMED_EMBED_REQUIRE_BROWSER=1``).

  >>> browser_required({}), browser_required({REQUIRE_VARIABLE: "1"})
  (False, True)
  >>> browser_required({REQUIRE_VARIABLE: "yes"})
  Traceback (most recent call last):
  ...
  ValueError: NAMED_EMBED_REQUIRE_BROWSER must be '1' (a missing browser
  fails) or '0' / unset (it skips); got 'yes'.
  """
  value = environ.get(REQUIRE_VARIABLE, "")
  if value not in ("", "0", "1"):
    raise ValueError(
      f"{REQUIRE_VARIABLE} must be '1' (a missing browser fails) or '0' /"
      f" unset (it skips); got {value!r}."
    )
  return value == "1"


def missing_reason() -> str | None:
  """Why no browser test can run here, or None if one can."""
  if not playwright_installed():
    return (
      "the `playwright` package is not installed"
      ' (`python -m pip install ".[test]"`)'
    )
  if chromium_path() is None:
    return (
      f"Chromium is not installed ({DEFAULT_CHROMIUM} is missing and no"
      " `chromium` is on the path): `apt-get update && apt-get install -y"
      " chromium` (.ci/run does so), never `playwright install`"
    )
  return None


def require_browser() -> str:
  """The Chromium path; skips (or fails, if required) when there is none."""
  reason = missing_reason()
  if reason is None:
    return chromium_path()
  if browser_required():
    pytest.fail(
      f"Browser test: {reason}. {REQUIRE_VARIABLE}=1 makes this a failure."
    )
  pytest.skip(
    f"Browser test skipped: {reason}. Set {REQUIRE_VARIABLE}=1 to make a"
    " missing browser a failure."
  )


@contextlib.contextmanager
def chromium() -> Iterator:
  """A Playwright Chromium browser, closed on exit (see `require_browser`)."""
  executable = require_browser()
  from playwright.sync_api import sync_playwright

  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(
      executable_path=executable, args=CHROMIUM_ARGS
    )
    try:
      yield browser
    finally:
      browser.close()

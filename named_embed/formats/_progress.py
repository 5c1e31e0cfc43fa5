"""A one-line text progress bar for reading large files (no dependencies)."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO

LARGE_FILE_BYTES = 50 * 1024 * 1024
"""Files larger than this show a progress bar unless ``progress=False``."""


def wants_progress(progress: bool | None, size: int) -> bool:
  """Resolves a ``progress=`` argument: None means "only for large files".

  >>> wants_progress(None, 1024), wants_progress(True, 1024)
  (False, True)
  """
  if progress is None:
    return size > LARGE_FILE_BYTES
  return bool(progress)


class ByteProgress:
  """Draws ``label [#####.....]  50% 12.0/24.0 MB`` on stderr, in place.

  Redraws at most every ``min_interval`` seconds; `close` draws the final
  state and ends the line. A disabled bar writes nothing.

  Example:

  >>> import io
  >>> out = io.StringIO()
  >>> bar = ByteProgress(2_000_000, "vectors.txt", stream=out, width=10,
  ...                    min_interval=0.0)
  >>> bar.update(1_000_000)
  >>> bar.close()
  >>> out.getvalue().split("\\r")[-1]
  'vectors.txt [##########] 100% 2.0/2.0 MB\\n'
  """

  def __init__(
    self,
    total: int,
    label: str,
    *,
    enabled: bool = True,
    stream: TextIO | None = None,
    width: int = 30,
    min_interval: float = 0.2,
  ):
    self.total = max(int(total), 1)
    self.label = os.path.basename(label) or label
    self.enabled = enabled
    self.stream = stream
    self.width = width
    self.min_interval = min_interval
    self.done = 0
    self._last_draw = -math.inf

  def update(self, done: int) -> None:
    """Records that ``done`` bytes (in total, not more) have been read."""
    self.done = min(int(done), self.total)
    if not self.enabled:
      return
    now = time.monotonic()
    if now - self._last_draw >= self.min_interval:
      self._last_draw = now
      self._draw()

  def close(self) -> None:
    """Draws the bar full and ends its line (call once, when done)."""
    if self.enabled:
      self.done = self.total
      self._draw()
      self._stream().write("\n")
      self._stream().flush()

  def line(self) -> str:
    """The text of the bar, without the carriage return."""
    fraction = self.done / self.total
    cells = int(fraction * self.width)
    bar = "#" * cells + "." * (self.width - cells)
    return (
      f"{self.label} [{bar}] {int(fraction * 100):3d}%"
      f" {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
    )

  def _stream(self) -> TextIO:
    return self.stream if self.stream is not None else sys.stderr

  def _draw(self) -> None:
    self._stream().write("\r" + self.line())
    self._stream().flush()

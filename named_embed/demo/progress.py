"""Showing and recording the progress of training."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TextIO


class ProgressBar:
  """A one-line text progress bar, redrawn in place with carriage returns.

  Example:

  >>> import io
  >>> out = io.StringIO()
  >>> bar = ProgressBar(4, out, width=8, min_interval=0.0)
  >>> for _ in range(4):
  ...   bar.update(loss=1.5)
  >>> bar.line()  # doctest: +ELLIPSIS
  'train [########] 4/4 loss 1.500 ...it/s'
  >>> bar.close()

  Args:
    total: Number of steps.
    stream: Where to draw (usually ``sys.stderr``).
    width: Number of cells of the bar.
    desc: Text in front of the bar.
    min_interval: Minimum seconds between redraws (the last step always
      draws).
  """

  def __init__(
    self,
    total: int,
    stream: TextIO,
    width: int = 30,
    desc: str = "train",
    min_interval: float = 0.1,
  ):
    self.total = total
    self.stream = stream
    self.width = width
    self.desc = desc
    self.min_interval = min_interval
    self.done = 0
    self.postfix: dict[str, float] = {}
    self._start = time.perf_counter()
    self._last_draw = -math.inf
    self._drawn = ""

  def line(self) -> str:
    """The current text of the bar."""
    fraction = self.done / self.total if self.total else 1.0
    filled = round(fraction * self.width)
    cells = "#" * filled + "." * (self.width - filled)
    stats = "".join(f" {k} {v:.3f}" for k, v in self.postfix.items())
    elapsed = time.perf_counter() - self._start
    rate = f" {(self.done - 1) / elapsed:.0f}it/s" if self.done > 1 else ""
    return f"{self.desc} [{cells}] {self.done}/{self.total}{stats}{rate}"

  def update(self, n: int = 1, **postfix: float) -> None:
    """Advances by ``n`` steps and shows ``postfix`` values after the bar."""
    now = time.perf_counter()
    if self.done == 0:  # the rate leaves out the first step (compilation)
      self._start = now
    self.done += n
    self.postfix.update(postfix)
    if self.done >= self.total or now - self._last_draw >= self.min_interval:
      self._last_draw = now
      self._draw()

  def write(self, message: str, stream: TextIO) -> None:
    """Prints a line to ``stream`` without garbling the bar."""
    self._clear()
    print(message, file=stream, flush=True)
    self._draw()

  def close(self) -> None:
    """Erases the bar."""
    self._clear()

  def _draw(self) -> None:
    line = self.line()
    padding = " " * max(0, len(self._drawn) - len(line))
    self.stream.write("\r" + line + padding)
    self.stream.flush()
    self._drawn = line

  def _clear(self) -> None:
    if self._drawn:
      self.stream.write("\r" + " " * len(self._drawn) + "\r")
      self.stream.flush()
      self._drawn = ""


@dataclasses.dataclass
class TrainingLog:
  """What `train` measured.

  Example:

  >>> TrainingLog().evals
  []

  Attributes:
    losses: Loss on each step's training batch, before that step's update.
    evals: ``(step, train_loss, valid_loss)`` on fixed batches of the two
      splits, at step 0, every ``log_every`` steps and at the last step.
  """

  losses: list[float] = dataclasses.field(default_factory=list)
  evals: list[tuple[int, float, float]] = dataclasses.field(
    default_factory=list
  )

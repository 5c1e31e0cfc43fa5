"""Tensors stored in blocks: block names, and the grid the blocks tile.

A block is a stored tensor named after the region of the whole that it
holds, one ``start:stop`` per dimension (``embeddings[0:32,0:16]``). The
blocks of a tensor must tile it as a grid, each cell exactly once: the
cuts along each dimension are the same for every block. `Grid` checks
that and finds the blocks a region overlaps, in time linear in the
number of blocks for the check (sorting the cuts: n log n) and
logarithmic plus the number of blocks found for each region, so a
tensor of many thousands of blocks is assembled and read quickly.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import re
from collections.abc import Iterator, Sequence

_NUMBER = "[0-9]{1,19}"  # any int64 index, and no giant integer to parse
_RANGE = f"{_NUMBER}:{_NUMBER}"
_BLOCK = re.compile(rf"(?P<key>.+)\[(?P<ranges>{_RANGE}(?:,{_RANGE})*)\]")

Region = tuple[tuple[int, ...], tuple[int, ...]]  # (start, stop)


def block_name(key: str, start: Sequence[int], stop: Sequence[int]) -> str:
  """The name of the block of tensor ``key`` from ``start`` to ``stop``.

  >>> block_name("embeddings", (32, 0), (64, 16))
  'embeddings[32:64,0:16]'
  """
  ranges = ",".join(f"{a}:{b}" for a, b in zip(start, stop))
  return f"{key}[{ranges}]"


def parse_block_name(name: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
  """``(key, start, stop)`` of a block name, or ``(name, (), ())`` for any
  other tensor name.

  >>> parse_block_name("embeddings[32:64,0:16]")
  ('embeddings', (32, 0), (64, 16))
  >>> parse_block_name("model.embed_tokens.weight")
  ('model.embed_tokens.weight', (), ())
  """
  match = _BLOCK.fullmatch(name)
  if match is None:
    return name, (), ()
  pairs = [r.split(":") for r in match["ranges"].split(",")]
  start = tuple(int(a) for a, _ in pairs)
  stop = tuple(int(b) for _, b in pairs)
  return match["key"], start, stop


@dataclasses.dataclass(frozen=True)
class Block:
  """One stored piece of a tensor: tensor ``name`` of ``file``, holding the
  region ``[start, stop)`` of the whole (the whole tensor for a tensor
  stored whole)."""

  file: str
  name: str
  start: tuple[int, ...]
  stop: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Grid:
  """Blocks that tile a tensor, in row-major order of their cells.

  Attributes:
    blocks: The blocks, sorted by their start (row-major cell order).
    cuts: Per dimension, the starts of its cells and then its end.
  """

  blocks: tuple[Block, ...]
  cuts: tuple[tuple[int, ...], ...]

  @property
  def shape(self) -> tuple[int, ...]:
    """The whole tensor's shape."""
    return tuple(cuts[-1] for cuts in self.cuts)

  @classmethod
  def of(cls, blocks: Sequence[Block], where: str) -> Grid:
    """The grid ``blocks`` tile, each cell once.

    Raises:
      ValueError: naming ``where``, if they do not.

    >>> blocks = [Block("f", "w[2:4]", (2,), (4,)), Block("f", "w[0:2]", (0,), (2,))]
    >>> Grid.of(blocks, "w").shape
    (4,)
    >>> Grid.of(blocks[:1], "w")
    Traceback (most recent call last):
    ...
    ValueError: w: its blocks do not tile dimension 0: ranges [(2, 4)] leave a gap or overlap at 0.
    """
    if len({len(b.start) for b in blocks}) != 1:
      ranks = sorted({len(b.start) for b in blocks})
      raise ValueError(f"{where}: its blocks have different ranks {ranks}.")
    cuts, cells = [], 1
    for d in range(len(blocks[0].start)):
      intervals = sorted({(b.start[d], b.stop[d]) for b in blocks})
      end = 0
      for a, b in intervals:
        if a != end or b <= a:
          shown = intervals if len(intervals) <= 20 else "(many)"
          raise ValueError(
            f"{where}: its blocks do not tile dimension {d}: ranges"
            f" {shown} leave a gap or overlap at {end}."
          )
        end = b
      cuts.append((*(a for a, _ in intervals), end))
      cells *= len(intervals)
    distinct = {(b.start, b.stop) for b in blocks}
    if len(distinct) != len(blocks) or len(blocks) != cells:
      shape = tuple(c[-1] for c in cuts)
      raise ValueError(
        f"{where}: its {len(blocks)} blocks do not cover a {shape}"
        f" tensor exactly once ({cells} blocks of the grid expected)."
      )
    ordered = tuple(sorted(blocks, key=lambda b: b.start))
    return cls(ordered, tuple(cuts))

  def overlapping(self, start, stop) -> Iterator[tuple[Block, Region]]:
    """The blocks the non-empty region ``[start, stop)`` overlaps, each
    with the part of the region it holds.

    >>> blocks = [Block("f", f"w[{i}:{i + 1}]", (i,), (i + 1,)) for i in range(9)]
    >>> [b.name for b, _ in Grid.of(blocks, "w").overlapping((3,), (5,))]
    ['w[3:4]', 'w[4:5]']
    """
    ranges, strides = [], []
    for cuts, a, b in zip(self.cuts, start, stop):
      first = bisect.bisect_right(cuts, a) - 1
      ranges.append(range(first, bisect.bisect_left(cuts, b)))
    stride = 1
    for cuts in reversed(self.cuts):
      strides.append(stride)
      stride *= len(cuts) - 1
    strides.reverse()
    for cell in itertools.product(*ranges):
      block = self.blocks[sum(i * s for i, s in zip(cell, strides))]
      yield block, overlap(block, start, stop)


def overlap(block: Block, start, stop) -> Region | None:
  """The part of ``[start, stop)`` inside ``block``, or None.

  >>> overlap(Block("f", "w", (0, 0), (4, 4)), (2, 3), (6, 9))
  ((2, 3), (4, 4))
  """
  low = tuple(max(a, b) for a, b in zip(start, block.start))
  high = tuple(min(a, b) for a, b in zip(stop, block.stop))
  if any(a >= b for a, b in zip(low, high)):
    return None
  return low, high


def size(region: Region) -> int:
  """The number of elements of ``region``.

  >>> size(((0, 2), (3, 5)))
  9
  """
  return math.prod(b - a for a, b in zip(*region))

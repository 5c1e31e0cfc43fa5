"""Parsers for the bodies of word2vec text and binary files.

`named_embed._src.files.word2vec` opens the file, reads the header and picks
the parser; these read the records after it, check each one, and name the
line (text) or record and byte offset (binary) of the first problem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import BinaryIO

import numpy as np

_CHUNK = 1 << 20
_MAX_TOKEN_BYTES = 1 << 16

Progress = Callable[[int], None]
"""Told how many bytes of the file have been read so far (for a bar)."""


class Rows:
  """A growing ``[n, dim]`` array of vectors and their distinct tokens.

  >>> rows = Rows(dim=2, dtype=np.dtype(np.float32), unit="line")
  >>> rows.add("a", np.array([1.0, 2.0]), 1)
  >>> rows.add("a", np.array([3.0, 4.0]), 2)
  Traceback (most recent call last):
  ...
  ValueError: line 2: token 'a' appears twice (first on line 1).
  """

  def __init__(self, dim: int, dtype: np.dtype, unit: str, capacity=1024):
    self.dim = dim
    self.unit = unit
    self.data = np.empty((max(capacity, 1), dim), dtype)
    self.tokens: list[str] = []
    self._first: dict[str, int] = {}

  def __len__(self) -> int:
    return len(self.tokens)

  def add(self, token: str, values: np.ndarray, place: int) -> None:
    """Appends a row; ``place`` is its line or record number (1-based)."""
    first = self._first.setdefault(token, place)
    if first != place:
      raise ValueError(
        f"{self.unit} {place}: token {token!r} appears twice (first on"
        f" {self.unit} {first})."
      )
    n = len(self.tokens)
    if n == len(self.data):
      grown = np.empty((2 * n, self.dim), self.data.dtype)
      grown[:n] = self.data
      self.data = grown
    self.data[n] = values
    self.tokens.append(token)

  def result(self) -> tuple[list[str], np.ndarray]:
    """The tokens and the ``[n, dim]`` array (trimmed to ``n`` rows)."""
    n = len(self.tokens)
    data = self.data if n == len(self.data) else self.data[:n].copy()
    return self.tokens, data


# --------------------------------------------------------------------- text


def parse_text_line(
  raw: bytes, number: int, dim: int | None
) -> tuple[str, np.ndarray]:
  """Splits ``token v1 ... vD`` (ASCII spaces) into the token and values.

  >>> parse_text_line(b"cat 0.5 -1e-3 \\n", 4, 2)
  ('cat', array([ 0.5  , -0.001]))
  >>> parse_text_line(b"cat 0.5 x\\n", 4, 2)
  Traceback (most recent call last):
  ...
  ValueError: line 4: value 2 of token 'cat' is 'x', which is not a number.
  """
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise ValueError(
      f"line {number}: not valid UTF-8 ({error.reason} at byte"
      f" {error.start} of the line): {raw[:80]!r}."
    ) from None
  fields = text.rstrip("\r\n").rstrip(" ").split(" ")
  token, values = fields[0], fields[1:]
  if dim is not None and len(values) != dim:
    raise ValueError(
      f"line {number}: expected {dim} values after the token {token!r}, got"
      f" {len(values)}."
      + (" (A token cannot contain spaces.)" if len(values) > dim else "")
    )
  if not values:
    raise ValueError(f"line {number}: token {token!r} has no values.")
  try:
    return token, np.array(values, dtype=np.float64)
  except ValueError:
    pass
  for i, value in enumerate(values):
    try:
      np.float64(value)
    except ValueError:
      raise ValueError(
        f"line {number}: value {i + 1} of token {token!r} is {value!r},"
        " which is not a number."
      ) from None
  raise ValueError(f"line {number}: cannot read the values of {token!r}.")


def read_text(
  lines: Iterable[bytes],
  *,
  header: tuple[int, int] | None,
  first_line: int,
  limit: int | None,
  dtype: np.dtype,
  offset: int = 0,
  progress: Progress | None = None,
) -> tuple[list[str], np.ndarray]:
  """Reads ``token v1 ... vD`` lines; empty lines are skipped.

  ``offset`` is the number of bytes before the first line (the header),
  for ``progress``, which is told the bytes read every 1024 lines.

  >>> read_text([b"a 1 2\\n", b"\\n", b"b 3 4\\n"], header=None,
  ...           first_line=1, limit=None, dtype=np.dtype(np.float32))
  (['a', 'b'], array([[1., 2.],
         [3., 4.]], dtype=float32))
  """
  count, dim = header if header is not None else (None, None)
  wanted = _wanted(count, limit)
  rows = None
  consumed = offset
  number = first_line - 1
  for number, raw in enumerate(lines, start=first_line):
    consumed += len(raw)
    if progress is not None and number % 1024 == 0:
      progress(consumed)
    if raw in (b"\n", b"\r\n"):
      continue
    if rows is not None and len(rows) == wanted:
      if limit is not None and wanted == limit:
        break
      raise ValueError(
        f"line {number}: the header (line 1) announces {count} vectors, but"
        " the file has more lines."
      )
    token, values = parse_text_line(raw, number, dim)
    if rows is None:
      dim = len(values)
      rows = Rows(dim, dtype, "line", capacity=min(wanted or 1024, 1 << 20))
    rows.add(token, values, number)
  found = 0 if rows is None else len(rows)
  if count is not None and found < wanted:
    raise ValueError(
      f"the header (line 1) announces {count} vectors, but the file ends"
      f" after {found}, on line {number}: is it truncated?"
    )
  if rows is None:
    raise ValueError("the file holds no vectors.")
  return rows.result()


# ------------------------------------------------------------------- binary


class ByteStream:
  """Buffered reads of a binary file, keeping track of the byte offset.

  ``progress``, if given, is told the bytes read after each chunk.

  >>> import io
  >>> stream = ByteStream(io.BytesIO(b"cat 1234"), offset=0)
  >>> stream.until_space(), stream.take(4), stream.offset
  (b'cat', b'1234', 8)
  """

  def __init__(
    self, f: BinaryIO, offset: int, progress: Progress | None = None
  ):
    self.f = f
    self.progress = progress
    self.buffer = b""
    self.pos = 0
    self.base = offset  # file offset of buffer[0]

  @property
  def offset(self) -> int:
    return self.base + self.pos

  def _more(self) -> bool:
    data = self.f.read(_CHUNK)
    if not data:
      return False
    self.base += self.pos
    self.buffer = self.buffer[self.pos :] + data
    self.pos = 0
    if self.progress is not None:
      self.progress(self.base + len(self.buffer))
    return True

  def until_space(self) -> bytes | None:
    """Bytes up to the next space (consumed, space included); None at EOF."""
    while True:
      end = self.buffer.find(b" ", self.pos)
      if end >= 0:
        token = self.buffer[self.pos : end]
        self.pos = end + 1
        return token
      if len(self.buffer) - self.pos > _MAX_TOKEN_BYTES:
        raise ValueError(
          f"byte {self.offset}: no space after a token within"
          f" {_MAX_TOKEN_BYTES} bytes; this is not word2vec binary data."
        )
      if not self._more():
        return None

  def take(self, size: int) -> bytes:
    """The next ``size`` bytes (fewer at the end of the file)."""
    while len(self.buffer) - self.pos < size and self._more():
      pass
    data = self.buffer[self.pos : self.pos + size]
    self.pos += len(data)
    return data

  def only_whitespace_left(self) -> bool:
    """Reads on until a byte other than whitespace, or the end of the file."""
    while True:
      if self.buffer[self.pos :].strip():
        return False
      self.pos = len(self.buffer)
      if not self._more():
        return True


def read_binary(
  stream: ByteStream,
  *,
  header: tuple[int, int],
  limit: int | None,
  dtype: np.dtype,
) -> tuple[list[str], np.ndarray]:
  """Reads ``token<space><dim little-endian float32>[\\n]`` records."""
  count, dim = header
  wanted = _wanted(count, limit)
  rows = Rows(dim, dtype, "record", capacity=wanted)
  size = 4 * dim
  for record in range(1, wanted + 1):
    start = stream.offset
    token = stream.until_space()
    vector = stream.take(size) if token is not None else b""
    if len(vector) < size:
      raise ValueError(
        f"record {record} (byte {start}): the file ends inside it, but the"
        f" header announces {count} vectors of {dim} float32 values: is it"
        " truncated?"
      )
    stripped = token.lstrip(b"\n")  # the newline ending the last record
    try:
      text = stripped.decode("utf-8", errors="strict")
    except UnicodeDecodeError as error:
      start += len(token) - len(stripped)
      raise ValueError(
        f"record {record} (byte {start}): the token {stripped!r} is not"
        f" valid UTF-8 ({error.reason} at byte {error.start} of the token)."
      ) from None
    rows.add(text, np.frombuffer(vector, "<f4"), record)
  if wanted == count and not stream.only_whitespace_left():
    raise ValueError(
      f"byte {stream.offset}: the header (line 1) announces {count} vectors,"
      " but more data follows the last one."
    )
  return rows.result()


def _wanted(count: int | None, limit: int | None) -> int | None:
  if count is None:
    return limit
  return count if limit is None else min(count, limit)

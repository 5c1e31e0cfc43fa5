"""Parsers for the bodies of word2vec text and binary files.

`named_embed._src.files.word2vec` opens the file, reads the header and picks
the parser; these read the records after it, check each one, and name the
line (text) or record and byte offset (binary) of the first problem.

What a file claims (its header's count and dimension) never sets what is
allocated or read: each is checked against the bytes the file has left
first, so the cost of reading is linear in the file's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import BinaryIO

import numpy as np

from named_embed._src.files import word2vec_checks as checks

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
    """Appends a row; ``place`` is its line or record number (1-based).

    Values beyond the range of the dtype become infinities, as in C (the
    readers turn numpy's overflow warning off around their loops).
    """
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

  The values must be C decimals (`word2vec_checks.NUMBER`).

  >>> parse_text_line(b"cat 0.5 -1e-3 \\n", 4, 2)
  ('cat', array([ 0.5  , -0.001]))
  >>> parse_text_line(b"cat 0.5 1_0\\n", 4, 2)
  Traceback (most recent call last):
  ...
  ValueError: line 4: value 2 of token 'cat' is '1_0', which is not a number.
  """
  body = raw.rstrip(b"\r\n").rstrip(b" ")
  space = body.find(b" ")
  token = checks.text_token(body if space < 0 else body[:space], raw, number)
  if space < 0:
    raise ValueError(f"line {number}: token {token!r} has no values.")
  count = body.count(b" ", space + 1) + 1  # before copying the values
  if dim is not None and count != dim:
    raise ValueError(
      f"line {number}: expected {dim} values after the token {token!r}, got"
      f" {count}."
      + (" (A token cannot contain spaces.)" if count > dim else "")
    )
  values = body[space + 1 :]
  try:
    return token, checks.parse_numbers(values)
  except ValueError:
    pass
  found = checks.first_bad_number(values)
  if found is None:
    raise ValueError(f"line {number}: cannot read the values of {token!r}.")
  i, field = found
  raise ValueError(
    f"line {number}: value {i} of token {token!r} is {field!r}, which is"
    " not a number."
  )


def read_text(
  lines: Iterable[bytes],
  *,
  header: tuple[int, int] | None,
  first_line: int,
  limit: int | None,
  dtype: np.dtype,
  offset: int = 0,
  size: int | None = None,
  progress: Progress | None = None,
) -> tuple[list[str], np.ndarray]:
  """Reads ``token v1 ... vD`` lines; empty lines are skipped.

  Every line must end with a newline, as every writer ends them: a last
  line without one is a file cut short. ``offset`` is the number of bytes
  before the first line (the header), for ``progress``, which is told the
  bytes read every 1024 lines; ``size``, the file's size if known, bounds
  the rows allocated ahead.

  >>> read_text([b"a 1 2\\n", b"\\n", b"b 3 4\\n"], header=None,
  ...           first_line=1, limit=None, dtype=np.dtype(np.float32))
  (['a', 'b'], array([[1., 2.],
         [3., 4.]], dtype=float32))
  """
  with np.errstate(over="ignore"):
    return _read_lines(
      lines, header, first_line, limit, dtype, offset, size, progress
    )


def _read_lines(
  lines: Iterable[bytes],
  header: tuple[int, int] | None,
  first_line: int,
  limit: int | None,
  dtype: np.dtype,
  offset: int,
  size: int | None,
  progress: Progress | None,
) -> tuple[list[str], np.ndarray]:
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
    if not raw.endswith(b"\n"):
      raise ValueError(checks.cut_line(number))
    token, values = parse_text_line(raw, number, dim)
    if rows is None:
      dim = len(values)
      rows = Rows(dim, dtype, "line", _capacity(wanted, dim, size, consumed))
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


def _capacity(
  wanted: int | None, dim: int, size: int | None, consumed: int
) -> int:
  """Rows to allocate ahead: no more than the file's bytes left can hold
  (each line has a token byte, and a space and a digit a value)."""
  capacity = min(wanted or 1024, 1 << 20)
  if size is not None:
    capacity = min(capacity, 1 + max(size - consumed, 0) // (2 * dim + 2))
  return capacity


# ------------------------------------------------------------------- binary


class ByteStream:
  """Buffered reads of a binary file, keeping track of the byte offset.

  ``progress``, if given, is told the bytes read after each chunk. A read
  asks the file for at least what is missing (never a chunk at a time), so
  each byte is copied a bounded number of times: reading is linear in the
  size of the file, however long a record is. ``buffer[pos:]`` are the
  bytes read but not yet consumed.

  >>> import io
  >>> stream = ByteStream(io.BytesIO(b"cat 1234\\n"), offset=0)
  >>> stream.until_space(), stream.take(4), stream.offset, stream.peek()
  (b'cat', b'1234', 8, b'\\n')
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

  def _more(self, at_least: int = 1) -> bool:
    """Reads ``max(at_least, _CHUNK)`` more bytes (fewer at the end)."""
    data = self.f.read(max(at_least, _CHUNK))
    if not data:
      return False
    self.base += self.pos
    self.buffer = self.buffer[self.pos :] + data  # the rest of a record
    self.pos = 0
    if self.progress is not None:
      self.progress(self.base + len(self.buffer))
    return True

  def until_space(self) -> bytes | None:
    """Bytes up to the next space (consumed, space included); None at EOF."""
    scanned = 0  # bytes after `pos` known to hold no space
    while True:
      end = self.buffer.find(b" ", self.pos + scanned)
      if 0 <= end <= self.pos + _MAX_TOKEN_BYTES:
        token = self.buffer[self.pos : end]
        self.pos = end + 1
        return token
      scanned = len(self.buffer) - self.pos
      if end >= 0 or scanned > _MAX_TOKEN_BYTES:
        raise ValueError(
          f"byte {self.offset}: no space after a token within"
          f" {_MAX_TOKEN_BYTES} bytes; this is not word2vec binary data."
        )
      if not self._more():
        return None

  def take(self, size: int) -> bytes:
    """The next ``size`` bytes (fewer at the end of the file)."""
    while len(self.buffer) - self.pos < size:
      if not self._more(size - (len(self.buffer) - self.pos)):
        break
    data = self.buffer[self.pos : self.pos + size]
    self.pos += len(data)
    return data

  def peek(self) -> bytes:
    """The next byte, not consumed; ``b""`` at the end of the file."""
    if self.pos == len(self.buffer) and not self._more():
      return b""
    return self.buffer[self.pos : self.pos + 1]


def read_binary(
  stream: ByteStream,
  *,
  header: tuple[int, int],
  limit: int | None,
  dtype: np.dtype,
  size: int,
) -> tuple[list[str], np.ndarray]:
  """Reads ``token<space><dim little-endian float32>[\\n]`` records.

  ``size`` is the file's size. Record 1 says whether a newline follows
  every record (the word2vec C tool) or none does (gensim); the others
  must agree, so that a byte lost or added is found where it happened.
  """
  count, dim = header
  wanted = _wanted(count, limit)
  least = 4 * dim + 2  # a token byte, the space and the vector
  left = size - stream.offset
  if left < least:
    raise _cut_record(1, stream.offset, count, dim)
  rows = Rows(dim, dtype, "record", capacity=min(wanted, left // least))
  with np.errstate(over="ignore"):  # float16: beyond its range is inf
    _read_records(stream, rows, wanted, count)
  if wanted == count and stream.peek():
    raise ValueError(
      f"byte {stream.offset}: the header (line 1) announces {count} vectors,"
      " but more data follows the last one."
    )
  return rows.result()


def _read_records(
  stream: ByteStream, rows: Rows, wanted: int, count: int
) -> None:
  dim = rows.dim
  newline = None  # a newline after every record? record 1 tells
  for record in range(1, wanted + 1):
    start = stream.offset
    buffer, pos = stream.buffer, stream.pos
    space = buffer.find(b" ", pos, pos + _MAX_TOKEN_BYTES + 1)
    end = space + 1 + 4 * dim
    if 0 <= space and end < len(buffer):  # all in the buffer: in short
      raw = buffer[pos:space]
      vector = np.frombuffer(buffer, "<f4", dim, space + 1)
      stream.pos = end
    else:
      raw = stream.until_space()
      vector = stream.take(4 * dim) if raw is not None else b""
      if len(vector) < 4 * dim:
        raise _cut_record(record, start, count, dim)
      vector = np.frombuffer(vector, "<f4")
    token = checks.binary_token(raw, record, start, newline)
    if newline and stream.buffer[stream.pos : stream.pos + 1] == b"\n":
      stream.pos += 1  # in short
    else:
      newline = _end_of_record(stream, record, start, newline)
    rows.add(token, vector, record)


def _cut_record(record: int, start: int, count: int, dim: int) -> ValueError:
  return ValueError(
    f"record {record} (byte {start}): the file ends inside it, but the"
    f" header announces {count} vectors of {dim} float32 values: is it"
    " truncated?"
  )


def _end_of_record(
  stream: ByteStream, record: int, start: int, newline: bool | None
) -> bool | None:
  """Consumes the newline after a vector if the records have one; returns
  whether they do (None while unknown: record 1 at the end of the file)."""
  following = stream.peek()
  if newline is None:
    newline = following == b"\n" if following else None
  elif newline and following != b"\n":
    raise ValueError(
      f"record {record} (byte {start}): "
      + (
        "the file ends right after its values, without the newline that"
        " ends the records before it: is it truncated?"
        if not following
        else f"expected a newline at byte {stream.offset}, after its"
        " values, as after the records before it, but found"
        f" {bytes(following)!r}: a byte missing or extra inside this"
        " record?"
      )
    )
  if newline:
    stream.pos += 1
  return newline


def _wanted(count: int | None, limit: int | None) -> int | None:
  if count is None:
    return limit
  return count if limit is None else min(count, limit)

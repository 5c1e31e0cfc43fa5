"""Strict checks for word2vec and GloVe files: the file, numbers, tokens.

Used by `named_embed._src.files.word2vec` (opening, saving) and
`named_embed._src.files.word2vec_readers` (parsing):

- only regular files are read (`open_regular`): a FIFO or a device has no
  size to check the header against, and may never end;
- the header and the layout (text or binary) are recognised (`layout`),
  and a first line without its newline is a file cut short;
- numbers are C decimals, as ``printf`` and ``strtod`` write and read them
  (`NUMBER`), never Python's wider spellings (``1_0``, non-ASCII digits,
  surrounding whitespace);
- a token read from a file is valid UTF-8, non-empty, and holds no control
  character (`text_token`, `binary_token`);
- a token written to a file also holds no space, line or paragraph
  separator, or lone surrogate (`check_saved_tokens`).
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import re
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from named_embed._src.base import regular_files

NUMBER = re.compile(
  rb"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
  rb"|(?i:inf|infinity|nan))"
)
"""A number as a word2vec or GloVe file may write it (`re.fullmatch`).

Decimals with an optional exponent, and ``inf``, ``infinity`` or ``nan``
in any case with an optional sign (C's ``printf`` writes ``-nan``, Java
``NaN`` and ``Infinity``).

>>> [bool(NUMBER.fullmatch(s)) for s in [b"-1.5e-3", b".5", b"1.", b"-nan"]]
[True, True, True, True]
>>> [bool(NUMBER.fullmatch(s)) for s in [b"1_0", b"0x1p3", b"1e", b" 1"]]
[False, False, False, False]
"""

# Every byte a `NUMBER` can hold, and the space between numbers. Python's
# float() accepts exactly the `NUMBER`s among the strings made of these
# bytes (its other spellings need "_", whitespace or non-ASCII digits).
_NUMBER_BYTES = b"0123456789+-.eEinftyaINFTYA"
_VALUES_BYTES = _NUMBER_BYTES + b" "

_BOM = codecs.BOM_UTF8
_HEADER = re.compile(rb"[ \t]*([0-9]+)[ \t]+([0-9]+)[ \t]*\r?\n")
_LINE_1 = 256  # bytes of line 1 looked at for a header
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SEGMENT = 1 << 18  # bytes of values parsed at a time

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NOT_SAVED = re.compile("[\x00-\x20\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def only_number_bytes(values: bytes) -> bool:
  """True if every byte of ``values`` can be part of a number or a space.

  One pass in C (`bytes.translate`), for the values of a whole line.

  >>> only_number_bytes(b"0.5 -1e-3 nan"), only_number_bytes(b"1_0 2")
  (True, False)
  """
  return not values.translate(None, _VALUES_BYTES)


def parse_numbers(values: bytes) -> np.ndarray:
  """The float64 values of ``b"v1 v2 ... vD"`` (single spaces, `NUMBER`s).

  Raises ValueError (without details: see `first_bad_number`) otherwise.
  Parsed by numpy from Python strings of at most `_SEGMENT` bytes at a
  time, which bounds the memory of a hostile line of millions of values.

  >>> parse_numbers(b"0.5 -1e-3 inf")
  array([ 0.5  , -0.001,    inf])
  """
  if not only_number_bytes(values):
    raise ValueError("not numbers")
  if len(values) <= _SEGMENT:  # a usual line
    return np.array(values.decode("ascii").split(" "), dtype=np.float64)
  parts = [
    # Python's float grammar; with only `_NUMBER_BYTES`, exactly C's.
    np.array(segment.decode("ascii").split(" "), dtype=np.float64)
    for segment in _segments(values)
  ]
  return parts[0] if len(parts) == 1 else np.concatenate(parts)


def first_bad_number(values: bytes) -> tuple[int, str] | None:
  """The place (1-based) and text of the first value that is not a
  `NUMBER` in ``b"v1 v2 ... vD"``, or None.

  >>> first_bad_number(b"1 2_0 x"), first_bad_number(b"1 2")
  ((2, '2_0'), None)
  """
  i = 0
  for segment in _segments(values):
    for field in segment.split(b" "):
      i += 1
      if not NUMBER.fullmatch(field):
        return i, field[:40].decode("utf-8", "backslashreplace")
  return None


def _segments(values: bytes) -> Iterator[bytes]:
  """``values`` in pieces of about `_SEGMENT` bytes, cut at spaces."""
  start = 0
  while True:
    end = values.find(b" ", start + _SEGMENT)
    if end < 0:
      yield values[start:]
      return
    yield values[start:end]
    start = end + 1


def describe(character: str) -> str:
  """Names a character for an error message.

  >>> describe(" "), describe("\\n"), describe("\\u2028")
  ('a space', "'\\\\n' (U+000A)", "'\\\\u2028' (U+2028)")
  >>> describe("\\ud800")
  'a lone surrogate (U+D800)'
  """
  code = ord(character)
  if character == " ":
    return "a space"
  if 0xD800 <= code <= 0xDFFF:
    return f"a lone surrogate (U+{code:04X})"
  return f"{character!r} (U+{code:04X})"


def control_character(token: str) -> str | None:
  """Describes the first control character of ``token`` (Unicode category
  Cc: U+0000-U+001F, U+007F-U+009F) and where it is, or None.

  >>> control_character("cat"), control_character("ca\\tt")
  (None, "'\\\\t' (U+0009) at character 2")
  """
  match = _CONTROL.search(token)
  if match is None:
    return None
  return f"{describe(match[0])} at character {match.start()}"


def saved_token_problem(token: str) -> str | None:
  """Why ``token`` cannot be written in a word2vec file, or None.

  Refused: the empty token; spaces and control characters (the separators
  of word2vec files, and what readers splitting lines break on); U+2028
  and U+2029 (line and paragraph separators, which ``str.splitlines``
  splits on); lone surrogates (not Unicode text: no UTF-8 encoding).

  >>> saved_token_problem("naïve"), saved_token_problem("")
  (None, 'is empty')
  >>> saved_token_problem("a\\x85b")
  "contains '\\\\x85' (U+0085) at character 1"
  """
  if not token:
    return "is empty"
  match = _NOT_SAVED.search(token)
  if match is None:
    return None
  return f"contains {describe(match[0])} at character {match.start()}"


def open_regular(path: str) -> tuple[BinaryIO, int]:
  """Opens ``path`` for reading if it is a regular file; returns its size.

  Opened without blocking, so a FIFO with no writer is refused instead of
  waiting for one; the type is then checked on the open file (no race
  with a rename). Directories, FIFOs, devices and sockets raise `OSError`
  naming ``path`` (`regular_files.open_fd`).

  >>> f, size = open_regular(os.devnull)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  OSError: /dev/null is a character device, not a regular file: ...
  """
  fd, info = regular_files.open_fd(path, "a word2vec or GloVe file")
  return os.fdopen(fd, "rb"), info.st_size


# ------------------------------------------------------- the file's layout


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the vectors of a file start, and how they are written."""

  header: tuple[int, int] | None
  binary: bool
  guessed: bool  # True if `binary` was auto-detected
  body: int  # offset of the first vector


def guess_note(layout: Layout | None) -> str:
  """Says, in an error message, that the binary layout was a guess.

  (A text file mistaken for binary gives baffling record errors; the
  reverse needs float32 bytes free of control characters, which is rare.)

  >>> guess_note(Layout((2, 3), binary=False, guessed=True, body=4))
  ''
  """
  if layout is None or not (layout.guessed and layout.binary):
    return ""
  return (
    " (The file was detected as word2vec binary; pass binary=False if it"
    " is text.)"
  )


def layout(
  f: BinaryIO, size: int, binary: bool | None, no_header: bool | None
) -> Layout:
  """Reads the optional BOM and the header; detects binary (see
  `load_word2vec` for ``binary`` and ``no_header``). Leaves ``f`` at the
  first vector.

  >>> import io
  >>> layout(io.BytesIO(b"2 3\\na 1 2 3\\n"), 14, None, None)
  Layout(header=(2, 3), binary=False, guessed=True, body=4)
  >>> layout(io.BytesIO(b"a 1 2"), 5, None, None)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: line 1: the file ends inside this line (no newline after it)...
  """
  if size == 0:
    raise ValueError("the file is empty.")
  start = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
  f.seek(start)
  first = f.readline(_LINE_1)
  if len(first) < _LINE_1 and not first.endswith(b"\n"):
    raise ValueError(cut_line(1))
  match = _HEADER.fullmatch(first)
  header = (int(match[1]), int(match[2])) if match else None
  if no_header:
    header = None
  elif header is None and (no_header is False or binary):
    kind = "binary" if binary else "text"
    raise ValueError(
      f"line 1: expected the word2vec {kind} header 'count dimension', got"
      f" {first[:60]!r}" + ("" if binary else "; pass no_header=True for GloVe")
    )
  if header is None:
    f.seek(start)
    return Layout(None, False, False, start)
  if 0 in header:
    raise ValueError(f"line 1: the header {first.strip()!r} announces no data.")
  body = f.tell()
  guessed = binary is None
  if guessed:
    binary = _looks_binary(f.read(4096))
    f.seek(body)
  return Layout(header, binary, guessed, body)


def _looks_binary(sample: bytes) -> bool:
  """Text is UTF-8 without control characters; float32 bytes rarely are."""
  try:
    text = codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
  except UnicodeDecodeError:
    return True
  return _TEXT_CONTROL.search(text) is not None


# ----------------------------------------------------------------- tokens


def cut_line(number: int) -> str:
  """The message for a last line without its newline.

  >>> cut_line(7)[:40]
  'line 7: the file ends inside this line ('
  """
  return (
    f"line {number}: the file ends inside this line (no newline after it):"
    " is it cut short? A complete file ends with a newline."
  )


def text_token(raw: bytes, line: bytes, number: int) -> str:
  """The token ``raw`` of text line ``line`` (number ``number``), decoded.

  >>> text_token(b"caf\\xc3\\xa9", b"caf\\xc3\\xa9 1\\n", 2)
  'café'
  >>> text_token(b"a\\tb", b"a\\tb 1\\n", 2)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: line 2: the token 'a\\tb' holds a control character, '\\t' ...
  """
  if not raw:
    raise ValueError(
      f"line {number}: the token is empty (the line starts with a space):"
      f" {line[:80]!r}."
    )
  try:
    token = raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise ValueError(
      f"line {number}: not valid UTF-8 ({error.reason} at byte"
      f" {error.start} of the line): {line[:80]!r}."
    ) from None
  control = control_character(token)
  if control is not None:
    raise ValueError(
      f"line {number}: the token {token!r} holds a control character,"
      f" {control}; word2vec values are separated by single spaces."
    )
  return token


def binary_token(
  raw: bytes, record: int, start: int, newline: bool | None
) -> str:
  """The token ``raw`` of a binary record (number ``record``, at byte
  ``start``), decoded; ``newline`` is False if the records have no newline
  after them (then a bad token hints at a record out of step).

  >>> binary_token(b"cat", 2, 20, True)
  'cat'
  >>> binary_token(b"\\ncat", 2, 19, False)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: record 2 (byte 19): the token '\\ncat' holds a control ... (a
  byte missing or extra in an earlier record?).
  """
  where = f"record {record} (byte {start})"
  shifted = (
    " (a byte missing or extra in an earlier record?)"
    if record > 1 and newline is False
    else ""
  )
  if not raw:
    raise ValueError(
      f"{where}: the token is empty (a space where a token starts){shifted}."
    )
  try:
    token = raw.decode("utf-8", errors="strict")
  except UnicodeDecodeError as error:
    raise ValueError(
      f"{where}: the token {raw[:80]!r} is not valid UTF-8 ({error.reason}"
      f" at byte {error.start} of the token){shifted}."
    ) from None
  control = control_character(token)
  if control is not None:
    raise ValueError(
      f"{where}: the token {token[:80]!r} holds a control character,"
      f" {control}{shifted}."
    )
  return token


def check_saved_tokens(tokens: tuple[str, ...], header: bool) -> None:
  """Refuses, before anything is written, the tokens that would not read
  back as they are (`saved_token_problem`); ``header`` is False for GloVe.

  >>> check_saved_tokens(("a", "b\\u2028"), header=True)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: save_word2vec: the token of row 1, 'b\\u2028', contains
  '\\u2028' (U+2028) at character 1: ... Rename it in the vocabulary first.
  """
  for row, token in enumerate(tokens):
    problem = saved_token_problem(token)
    if problem is not None:
      raise ValueError(
        f"save_word2vec: the token of row {row}, {token!r}, {problem}:"
        " word2vec files separate tokens and values with spaces and"
        " newlines, and hold UTF-8 text, so it would not read back as it"
        " is. Rename it in the vocabulary first."
      )
  if not header and tokens[0].startswith("\ufeff"):
    raise ValueError(
      f"save_word2vec: the token of row 0, {tokens[0]!r}, starts with"
      " U+FEFF, which at the start of a GloVe file reads as a byte order"
      " mark and is dropped. Rename it, or write a header (header=True)."
    )

"""word2vec and GloVe files: `load_word2vec` and `save_word2vec`.

Three layouts, all with one token per row:

- word2vec text: a header line ``count dimension``, then one line per
  vector, ``token v1 v2 ... vD``, separated by single ASCII spaces;
- GloVe text: the same lines without the header;
- word2vec binary: the header line, then per vector the UTF-8 token, a
  space, ``D`` little-endian float32 values, and usually a newline.

Tokens are everything before the first space of a line, so they cannot
contain spaces (or newlines), nor, here, control characters; other
characters, including non-ASCII whitespace, are kept as they are. Reading
is strict, and linear in the file's size whatever its header claims: see
`named_embed._src.files.word2vec_readers` and
`named_embed._src.files.word2vec_checks`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import BinaryIO, TextIO

import jax
import numpy as np

from named_embed._src.base import validation
from named_embed._src.base.vocabulary import Vocabulary
from named_embed._src.files import common
from named_embed._src.files import word2vec_checks as checks
from named_embed._src.files import word2vec_readers as readers
from named_embed._src.files.atomic import replacing
from named_embed._src.tables.contract import AbstractTable, check_table
from named_embed._src.tables.table import EmbeddingTable
from named_embed._src.tools.row_scan import host_row_chunks

_ROWS_PER_CHUNK_VALUES = 1 << 18

LARGE_FILE_BYTES = 50 * 1024 * 1024
"""Reading files larger than this shows progress when ``progress=None``."""
LOG_LINE_SECONDS = 10.0
"""Progress written to a log or pipe: a line at most this often."""


def load_word2vec(
  path: str | os.PathLike[str],
  *,
  binary: bool | None = None,
  limit: int | None = None,
  no_header: bool | None = None,
  vocabulary_axis: str = "vocabulary",
  embedding_axis: str = "embedding",
  dtype: jax.typing.DTypeLike = np.float32,
  freeze: bool = True,
  name: str = "embeddings",
  progress: bool | None = None,
) -> EmbeddingTable:
  """Reads a word2vec (text or binary) or GloVe file as a table.

  Args:
    path: The file.
    binary: True for word2vec binary, False for text, None to detect it
      from the bytes after the header (text has no control characters).
    limit: Read only the first ``limit`` vectors (the most frequent ones,
      in the usual files).
    no_header: True for GloVe files (no header line), False to require a
      header, None to detect it: a first line of exactly two integers is a
      header (so a GloVe file opening with a number token and a 1-D vector
      needs True).
    vocabulary_axis: Name of the vocabulary axis.
    embedding_axis: Name of the embedding axis.
    dtype: Storage dtype; values are parsed in float64 and rounded once.
    freeze: Frozen (default) or trainable, as in
      `EmbeddingTable.from_pretrained`.
    name: Parameter label prefix when ``freeze=False``.
    progress: Show the progress of reading, on stderr, with
      `tqdm.auto.tqdm`: a bar redrawn in place on a terminal, a widget in
      a notebook. Into a log or a pipe (stderr not a terminal) ``True``
      writes plain lines instead, never a carriage return: one when
      reading starts, one every 10 seconds, one at the end. None
      (default): a bar on a terminal or in a notebook, for files over
      50 MB only; nothing into a log or a pipe. False: nothing.

  Returns:
    A table with the file's tokens as its `Vocabulary` (no special roles
    are guessed: attach them with `EmbeddingTable.with_vocabulary`).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    OSError: if ``path`` is not a regular file (a directory, a FIFO, a
      device) or cannot be read; the message names it.
    ValueError: for a malformed file, naming the file, the line (text) or
      record and byte (binary) and what was wrong: wrong number of values,
      a value that is not a C decimal number, a count that differs from
      the header, a duplicate token, a token that is empty, not UTF-8 or
      holds a control character, a file cut short (a text file whose last
      line has no newline, a binary file cut inside a record), binary
      records out of step (the newline after each vector, as after the
      first, missing or misplaced), or bytes after the last record.

  Example:

  >>> import os, tempfile
  >>> from named_embed import formats
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "glove.txt")
  ...   with open(path, "w") as f:
  ...     _ = f.write("the 0.1 0.2 0.3\\ncat 0.4 0.5 0.6\\n")
  ...   table = formats.load_word2vec(path)
  >>> table.vocab_size, table.embedding_axes, table.vocabulary.id("cat")
  (2, {'embedding': 3}, 1)
  """
  path = os.fspath(path)
  dtype = validation.check_float_dtype("dtype", dtype)
  if limit is not None:
    limit = validation.check_positive_int("limit", limit)
  f, size = checks.open_regular(path)
  layout = None
  try:
    with f, _progress(path, size, progress) as report:
      layout = checks.layout(f, size, binary, no_header)
      tokens, rows = _read_body(f, layout, size, limit, dtype, report)
      report(size)
  except ValueError as error:
    raise ValueError(f"{path}: {error}{checks.guess_note(layout)}") from None
  except OSError as error:  # a failed read: name the file
    if error.filename is None:
      error.filename = path
    raise
  return common.build_table(
    rows,
    source=path,
    vocabulary=Vocabulary(tokens),
    vocabulary_axis=vocabulary_axis,
    embedding_axes=(embedding_axis,),
    freeze=freeze,
    name=name,
  )


def _read_body(
  f: BinaryIO,
  layout: checks.Layout,
  size: int,
  limit: int | None,
  dtype: np.dtype,
  report: readers.Progress,
) -> tuple[list[str], np.ndarray]:
  report(layout.body)
  if layout.binary:
    stream = readers.ByteStream(f, layout.body, report)
    return readers.read_binary(
      stream, header=layout.header, limit=limit, dtype=dtype, size=size
    )
  return readers.read_text(
    f,
    header=layout.header,
    first_line=1 if layout.header is None else 2,
    limit=limit,
    dtype=dtype,
    offset=layout.body,
    size=size,
    progress=report,
  )


# ----------------------------------------------------------------- progress


@contextlib.contextmanager
def _progress(
  path: str, size: int, progress: bool | None
) -> Iterator[readers.Progress]:
  """Yields ``report(bytes_read)``, shown as ``progress=`` asks (see above).

  The bar is `tqdm.auto.tqdm` on stderr; it is closed (and its line ended)
  when the block ends, also on errors.
  """
  stream = sys.stderr
  if not (size > LARGE_FILE_BYTES if progress is None else progress):
    yield lambda done: None
    return
  from tqdm import asyncio as tqdm_asyncio
  from tqdm import auto as tqdm_auto
  from tqdm import std as tqdm_std

  # tqdm.auto is the console tqdm unless it found a notebook (a widget).
  in_notebook = tqdm_auto.tqdm is not tqdm_asyncio.tqdm
  redrawn = in_notebook or _is_terminal(stream)
  if progress is None and not redrawn:  # no bar into logs unless asked
    yield lambda done: None
    return
  settings = dict(
    total=size,
    desc=os.path.basename(path) or path,
    unit="B",
    unit_scale=True,
    unit_divisor=1024,
  )
  if redrawn:
    bar = tqdm_auto.tqdm(file=stream, **settings)
  else:  # a log or a pipe: plain lines, no carriage returns
    bar = tqdm_std.tqdm(
      file=_LogLines(stream),
      mininterval=LOG_LINE_SECONDS,
      bar_format="{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt}"
      " [{elapsed}<{remaining}, {rate_fmt}]",
      **settings,
    )
  with bar:
    yield lambda done: bar.update(max(done - bar.n, 0))


def _is_terminal(stream: TextIO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # no isatty, or closed
    return False


class _LogLines:
  """A file for tqdm that writes each redraw as a line of its own.

  For logs and pipes: tqdm redraws its bar in place, starting each state
  with a carriage return; this drops the carriage returns (and the padding
  spaces) and ends every state with a newline.

  >>> import io
  >>> out = io.StringIO()
  >>> lines = _LogLines(out)
  >>> _ = lines.write("\\rvectors.txt:  50% 1.00k/2.00k   ")
  >>> _ = lines.write("\\rvectors.txt: 100% 2.00k/2.00k")
  >>> _ = lines.write("\\n")
  >>> print(out.getvalue(), end="")
  vectors.txt:  50% 1.00k/2.00k
  vectors.txt: 100% 2.00k/2.00k
  """

  def __init__(self, stream: TextIO):
    self.stream = stream

  def write(self, text: str) -> int:
    """Writes the non-blank states in ``text``, one line each."""
    for state in text.split("\r"):
      state = state.strip()
      if state:
        self.stream.write(state + "\n")
    return len(text)

  def flush(self) -> None:
    """Flushes the stream."""
    self.stream.flush()


# ------------------------------------------------------------------- saving


def save_word2vec(
  table: AbstractTable,
  path: str | os.PathLike[str],
  *,
  binary: bool = False,
  header: bool = True,
) -> None:
  """Writes a table with a vocabulary as a word2vec or GloVe file, atomically.

  Text values are the shortest decimals that read back to the same float32
  (float64 for float64 tables), so float32, bfloat16 and float16 values
  round-trip exactly (load bfloat16/float16 with ``dtype=``). Binary files
  store float32: bfloat16 and float16 widen exactly; float64 is refused.
  Kept: tokens and values. Not kept: axis names, padding index, roles.
  The file is written beside ``path`` under a temporary name and renamed
  over it when complete, so an interrupted save leaves the previous file
  (or none); the next save of ``path`` deletes the temporaries of saves
  that were killed, never those of saves still running (docs/formats.md).

  Any kind of table is written as lookups read it (a quantised table's
  rows dequantised, an adapted table's merged), its token rows only, from
  any layout: the rows are copied to the host and written one chunk at a
  time, so neither the device nor the host holds a float copy of the whole
  table.

  Args:
    table: A table with one embedding axis and a vocabulary.
    path: Destination file.
    binary: Write word2vec binary instead of text.
    header: Write the ``count dimension`` line; False gives a GloVe file
      (text only).

  Raises:
    TypeError: if ``table`` is not a named_embed table.
    ValueError: for a table without a vocabulary, with several embedding
      axes, a float64 table in binary, ``binary`` without ``header``, or a
      token that would not read back as it is: empty, or holding a space,
      a control character (``\\n``, ``\\t``, ``\\x00``, ``\\x85``, ...),
      U+2028, U+2029 or a lone surrogate; nothing is written then. What is
      written reads back equal (see docs/formats.md).

  Example:

  >>> import os, pathlib, tempfile, numpy as np, named_embed as ne
  >>> from named_embed import formats
  >>> table = ne.EmbeddingTable.from_pretrained(
  ...     np.array([[0.1, 2.0], [-3.5, 1e-8]], np.float32)
  ... ).with_vocabulary(ne.Vocabulary(["the", "cat"]))
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "vectors.txt")
  ...   formats.save_word2vec(table, path)
  ...   print(pathlib.Path(path).read_text())
  2 2
  the 0.1 2.0
  cat -3.5 1e-08
  """
  check_table(table, "ne.save_word2vec")
  if table.vocabulary is None:
    raise ValueError(
      "save_word2vec: word2vec files name every row with its token, but this"
      " table has no vocabulary. Attach one first:"
      " table.with_vocabulary(ne.Vocabulary(tokens))."
    )
  if binary and not header:
    raise ValueError(
      "save_word2vec: word2vec binary files always start with a header;"
      " header=False (GloVe) is for text files only."
    )
  common.check_one_axis(table, "A word2vec file")
  tokens = table.vocabulary.tokens
  checks.check_saved_tokens(tokens, header)
  dtype = np.dtype(table.dtype)
  if binary and dtype.itemsize > 4:
    raise ValueError(
      f"save_word2vec: word2vec binary stores float32, which would round this"
      f" {dtype} table. Save it as text (binary=False), or cast it first."
    )
  (dimension,) = table.embedding_axes.values()
  write = _write_binary if binary else _write_text
  with replacing(path) as temp, open(temp, "wb") as f:
    if header:
      f.write(f"{table.vocab_size} {dimension}\n".encode())
    for start, rows in host_row_chunks(table):
      write(f, tokens[start : start + rows.shape[0]], rows)


def _chunks(rows: np.ndarray):
  step = max(1, _ROWS_PER_CHUNK_VALUES // max(rows.shape[1], 1))
  for start in range(0, rows.shape[0], step):
    yield start, rows[start : start + step]


def _write_text(f: BinaryIO, tokens: tuple[str, ...], rows: np.ndarray):
  """Writes ``rows``, one line each, after their ``tokens``."""
  wide = np.float64 if rows.dtype.itemsize > 4 else np.float32
  for start, chunk in _chunks(rows):
    text = chunk.astype(wide).astype(str)
    lines = [
      f"{tokens[start + i]} {' '.join(values)}\n"
      for i, values in enumerate(text.tolist())
    ]
    f.write("".join(lines).encode("utf-8"))


def _write_binary(f: BinaryIO, tokens: tuple[str, ...], rows: np.ndarray):
  """Writes ``rows``, one record each, after their ``tokens``."""
  for start, chunk in _chunks(rows):
    data = chunk.astype("<f4")
    f.write(
      b"".join(
        tokens[start + i].encode("utf-8") + b" " + data[i].tobytes() + b"\n"
        for i in range(len(data))
      )
    )

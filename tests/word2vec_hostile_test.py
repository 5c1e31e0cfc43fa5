"""Hostile and damaged word2vec / GloVe files, and what `save_word2vec`
must refuse so that everything it writes reads back equal.

A load of a hostile file either gives the table the bytes hold or raises a
ValueError / OSError naming the file, within a time and memory bound set
by the file's size (never by the counts its header claims). For damaged
files (hypothesis below), the table the bytes hold is decided by
`reference`, an independent, plain reading of the grammar documented in
docs/formats.md; for cut files, independently of any parser: a cut file
is refused, except a GloVe file cut exactly between two rows (which looks
like a shorter file) and gives its first rows.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import threading
import time
import tracemalloc
import unicodedata

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import named_embed as ne
from named_embed import formats
from named_embed._src.files import word2vec_readers as readers

TOKENS = ["the", "cat", "naïve", "東京", "a\u00a0b"]
VECTORS = np.array(
  [
    [0.1, -2.0, 3.5],
    [1e-8, 0.0, -0.0],
    [123456.78, np.inf, 2.25],
    [np.nan, 0.2, -1e30],
    [7.0, 8.0, -1.245911],
  ],
  np.float32,
)
# format: (save_word2vec options, load_word2vec options)
FORMATS = {
  "text": (dict(binary=False), dict(binary=False, no_header=False)),
  "glove": (dict(header=False), dict(binary=False, no_header=True)),
  "binary": (dict(binary=True), dict(binary=True, no_header=False)),
  "gensim": (None, dict(binary=True, no_header=False)),  # no newlines
}


def bits(array) -> np.ndarray:
  array = np.asarray(array)
  return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.itemsize])


def make_table(tokens=TOKENS, vectors=VECTORS):
  return ne.EmbeddingTable.from_pretrained(vectors).with_vocabulary(
    ne.Vocabulary(tokens)
  )


def gensim_binary(tokens=TOKENS, vectors=VECTORS, newline=b"") -> bytes:
  """A binary file as gensim 4 writes it: no newline after the records
  (``newline=b"\\n"``: as the word2vec C tool writes it)."""
  data = f"{len(tokens)} {vectors.shape[1]}\n".encode()
  for token, row in zip(tokens, vectors):
    token = token if isinstance(token, bytes) else token.encode()
    data += token + b" " + struct.pack(f"<{len(row)}f", *row) + newline
  return data


def saved_bytes(fmt: str, tokens=TOKENS, vectors=VECTORS) -> bytes:
  options = FORMATS[fmt][0]
  if options is None:
    return gensim_binary(tokens, vectors)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "saved")
    formats.save_word2vec(make_table(tokens, vectors), path, **options)
    with open(path, "rb") as f:
      return f.read()


def write(tmp_path, data: bytes, name="vectors.bin") -> str:
  path = tmp_path / name
  path.write_bytes(data)
  return os.fspath(path)


def attempt(path, max_seconds=2.0, max_bytes=None, **options):
  """Loads ``path``: the table, or the ValueError / OSError, which must name
  the file. Checks the time taken and the memory allocated (tracemalloc:
  Python objects and numpy buffers), at most 50 MB + 20 x the file size
  unless ``max_bytes`` says otherwise."""
  size = os.path.getsize(path) if os.path.isfile(path) else 0
  limit = 50e6 + 20 * size if max_bytes is None else max_bytes
  tracemalloc.start()
  start = time.perf_counter()
  try:
    outcome = formats.load_word2vec(path, progress=False, **options)
  except (ValueError, OSError) as error:
    outcome = error
  finally:
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
  assert seconds < max_seconds, (seconds, path)
  assert peak < limit, (peak, limit, path)
  if isinstance(outcome, BaseException):
    assert not isinstance(outcome, UnicodeError), repr(outcome)
    assert os.fspath(path) in str(outcome), repr(outcome)
  return outcome


def error_of(path, **options) -> str:
  outcome = attempt(path, **options)
  assert isinstance(outcome, (ValueError, OSError)), outcome
  return str(outcome)


def check(table, tokens=TOKENS, vectors=VECTORS):
  assert table.vocabulary.tokens == tuple(tokens)
  np.testing.assert_array_equal(bits(table.rows_array()), bits(vectors))


# -------------------------------------------- 1. what the header claims


def test_binary_header_with_a_huge_dimension_fails_before_allocating(
  tmp_path,
):
  path = write(tmp_path, b"3 1000000000000\na " + bytes(16))
  message = error_of(path, max_bytes=5e6)
  assert "record 1 (byte 16): the file ends inside it" in message


def test_binary_header_with_a_huge_count_allocates_what_the_file_holds(
  tmp_path,
):
  header = b"100000000 1000\n"
  record = b"a " + np.ones(1000, "<f4").tobytes() + b"\n"
  path = write(tmp_path, header + record)
  message = error_of(path, max_bytes=5e6)
  start = len(header + record)
  assert f"record 2 (byte {start}): the file ends inside it" in message


def test_text_header_with_a_huge_count_allocates_what_the_file_holds(
  tmp_path,
):
  line = "a " + " ".join(["0.5"] * 1000) + "\n"
  path = write(tmp_path, ("100000000 1000\n" + line).encode(), "v.txt")
  message = error_of(path, max_bytes=5e6)
  assert "announces 100000000 vectors, but the file ends after 1" in message


def test_glove_first_line_of_many_values_allocates_one_row(tmp_path):
  values = np.arange(300_000, dtype=np.float32) / 8
  line = "a " + " ".join(map(str, values.tolist())) + "\n"
  path = write(tmp_path, line.encode(), "glove.txt")
  size = os.path.getsize(path)
  table = attempt(path, max_bytes=10e6 + 12 * size)
  check(table, ["a"], values[None])


def test_a_long_line_with_the_wrong_count_is_refused_without_splitting(
  tmp_path,
):
  data = b"2 3\na 1 2 3\nb " + b"1 " * 3_000_000 + b"\n"
  path = write(tmp_path, data, "v.txt")
  # Python's readline holds the line twice, the line without its newline
  # once more; splitting it (3 million strings) took 150 MB.
  message = error_of(path, max_bytes=4 * len(data) + 5e6)
  assert "line 3: expected 3 values after the token 'b', got 3000000" in message


def test_a_long_binary_record_is_read_in_linear_time(tmp_path, monkeypatch):
  # Small chunks make any re-buffering of the whole record show at once.
  monkeypatch.setattr(readers, "_CHUNK", 256)
  values = np.linspace(-1, 1, 1 << 20, dtype=np.float32)
  data = f"1 {values.size}\n".encode() + b"w " + values.tobytes() + b"\n"
  path = write(tmp_path, data)
  check(attempt(path, max_seconds=1.0), ["w"], values[None])


# -------------------------------------------------------- 2. cut files


@pytest.mark.parametrize("fmt", ["text", "glove"])
def test_text_cut_inside_its_last_number_is_refused(tmp_path, fmt):
  data = saved_bytes(fmt)
  assert data.endswith(b" -1.245911\n")
  for end in (-4, -2, -1):  # "-1.245", "-1.24591", the newline missing
    path = write(tmp_path, data[:end], "cut.txt")
    lines = data.count(b"\n")
    assert (
      f"line {lines}: the file ends inside this line (no newline after it):"
      " is it cut short? A complete file ends with a newline"
    ) in error_of(path, **FORMATS[fmt][1])
    assert "the file ends inside this line" in error_of(path)


def test_glove_cut_inside_its_first_line_is_refused(tmp_path):
  path = write(tmp_path, b"the 0.418", "glove.txt")
  assert "line 1: the file ends inside this line" in error_of(path)
  path = write(tmp_path, b"5 3", "header.txt")
  assert "line 1: the file ends inside this line" in error_of(path)
  assert "line 1: the file ends inside" in error_of(path, binary=True)


def test_glove_cut_between_two_rows_reads_its_first_rows(tmp_path):
  """The limit of a headerless format: nothing tells a shorter file."""
  data = saved_bytes("glove")
  two_rows = data[: data.index(b"\n", data.index(b"\n") + 1) + 1]
  check(attempt(write(tmp_path, two_rows, "g.txt")), TOKENS[:2], VECTORS[:2])
  text = saved_bytes("text")  # with a header, the count tells
  cut = text[: text.rindex(b"\n", 0, -1) + 1]
  assert "announces 5 vectors, but the file ends after 4" in error_of(
    write(tmp_path, cut, "t.txt")
  )


# ------------------------------------------ 3. binary records out of step


def record_start(data: bytes, record: int) -> int:
  """Offset of a record of `TOKENS`/`VECTORS` in a binary file."""
  offset = data.index(b"\n") + 1
  for token in TOKENS[: record - 1]:
    offset += len(token.encode()) + 1 + 12
    offset += data[offset : offset + 1] == b"\n"  # the C tool's newline
  return offset


@pytest.mark.parametrize("change", ["delete", "insert"])
def test_a_byte_lost_or_added_inside_a_vector_is_found_there(tmp_path, change):
  data = saved_bytes("binary")
  start = record_start(data, 3)  # "naïve": 6 bytes, then the space
  assert data[start : start + 7] == "naïve ".encode()
  at = start + 7 + 5  # inside the values of record 3
  bad = data[:at] + data[at + 1 :] if change == "delete" else (
    data[:at] + b"\x42" + data[at:]
  )  # fmt: skip
  message = error_of(write(tmp_path, bad))
  assert f"record 3 (byte {start}): expected a newline at byte" in message
  assert "a byte missing or extra inside this record?" in message


def test_records_without_newlines_must_all_have_none(tmp_path):
  data = gensim_binary()
  check(attempt(write(tmp_path, data)))
  start = record_start(data, 3)
  bad = data[:start] + b"\n" + data[start:]
  message = error_of(write(tmp_path, bad))
  assert f"record 3 (byte {start}): the token '\\nnaïve' holds a control" in (
    message
  )
  assert "a byte missing or extra in an earlier record?" in message


def test_binary_file_must_end_right_after_its_last_record(tmp_path):
  data = saved_bytes("binary")
  for extra in (b"\n", b" ", b"\x00", b"\n\n"):
    message = error_of(write(tmp_path, data + extra))
    assert f"byte {len(data)}: the header (line 1) announces 5" in message
  message = error_of(write(tmp_path, data[:-1]))
  start = record_start(data, 5)
  assert (
    f"record 5 (byte {start}): the file ends right after its values,"
    " without the newline that ends the records before it"
  ) in message


@pytest.mark.parametrize(
  "token, problem",
  [
    (b"a\x01b", "holds a control character, '\\x01' (U+0001) at character"),
    (b"\xc2\x85", "holds a control character, '\\x85' (U+0085)"),
    (b"", "the token is empty"),
    (b"\xff", "is not valid UTF-8"),
  ],
)
def test_binary_tokens_are_text(tmp_path, token, problem):
  data = gensim_binary([b"ok", token, b"x", b"y", b"z"], newline=b"\n")
  message = error_of(write(tmp_path, data))
  assert "record 2 (byte 20): " in message and problem in message


# ----------------------------------------------------- 4. strict numbers


@pytest.mark.parametrize(
  "value", ["1_0", "١", "١٢٣", "１", "1\x0c", "\u00a01", "0x1p3", "nan(1)",
            "1e", "--1", "1.2.3", "1,5", "inf5", "infinit"],
)  # fmt: skip
def test_values_must_be_c_decimal_numbers(tmp_path, value):
  data = f"2 2\na 1 2\nb 3 {value}\n".encode()
  shown = repr(value)
  assert (
    f"line 3: value 2 of token 'b' is {shown}, which is not a number"
    in error_of(write(tmp_path, data, "v.txt"), binary=False)
  )


SPELLINGS = {
  "-nan": np.nan, "NaN": np.nan, "nan": np.nan, "inf": np.inf,
  "-inf": -np.inf, "Infinity": np.inf, "-INFINITY": -np.inf, "+1": 1.0,
  "1.": 1.0, ".5": 0.5, "1E+05": 1e5, "-0": -0.0, "1e500": np.inf,
  "-1e-500": -0.0, "007": 7.0, "3.4028235e+38": 3.4028235e38,
}  # fmt: skip


def test_every_c_spelling_reads(tmp_path):
  line = "w " + " ".join(SPELLINGS) + "\n"
  table = attempt(write(tmp_path, line.encode(), "g.txt"))
  want = np.array(list(SPELLINGS.values()), np.float32)[None]
  np.testing.assert_array_equal(np.asarray(table.rows_array()), want)
  assert np.signbit(np.asarray(table.rows_array())[0, [11, 13]]).all()  # -0


def test_float16_loads_out_of_range_values_as_infinities(tmp_path):
  path = write(tmp_path, b"w 1e6 -70000 1.5\n", "g.txt")
  table = formats.load_word2vec(path, dtype=np.float16)
  want = np.array([[np.inf, -np.inf, 1.5]], np.float16)
  np.testing.assert_array_equal(np.asarray(table.rows_array()), want)


# ------------------------------------------- 5. what save_word2vec writes


REFUSED = ["a\nb", "a\tb", "a\x00", "\x0b", "a\x0c", "\x1c", "\x1d",
           "\x1e", "\x1f", "a\x85", "\x7f", "\x9f", "a\u2028", "\u2029b",
           "a b", "a\r"]  # fmt: skip


@pytest.mark.parametrize("token", REFUSED, ids=ascii)
@pytest.mark.parametrize("binary", [False, True])
def test_save_refuses_tokens_that_would_not_read_back(tmp_path, token, binary):
  table = make_table(["ok", token], np.ones((2, 2), np.float32))
  with pytest.raises(ValueError) as caught:
    formats.save_word2vec(table, tmp_path / "out", binary=binary)
  assert f"the token of row 1, {token!r}, contains " in str(caught.value)
  assert os.listdir(tmp_path) == []


def test_save_refuses_a_lone_surrogate_with_a_clear_message(tmp_path):
  table = make_table(["ok", "a\ud800"], np.ones((2, 2), np.float32))
  for binary in (False, True):
    with pytest.raises(ValueError) as caught:
      formats.save_word2vec(table, tmp_path / "out", binary=binary)
    assert type(caught.value) is ValueError  # not a UnicodeEncodeError
    assert (
      "the token of row 1, 'a\\ud800', contains a lone surrogate (U+D800)"
      " at character 1"
    ) in str(caught.value)
  assert os.listdir(tmp_path) == []


def test_a_byte_order_mark_first_in_a_glove_file_is_refused(tmp_path):
  table = make_table(["\ufeffa", "b"], np.ones((2, 2), np.float32))
  with pytest.raises(ValueError, match="starts with U\\+FEFF, which at the"):
    formats.save_word2vec(table, tmp_path / "g.txt", header=False)
  formats.save_word2vec(table, tmp_path / "w.txt")  # after a header: kept
  check(formats.load_word2vec(tmp_path / "w.txt"), ["\ufeffa", "b"],
        np.ones((2, 2), np.float32))  # fmt: skip


UNUSUAL = ["naïve", "東京", "a\u00a0b", "\u3000", "\u200b", "🙂",
           "e\u0301", "\u202e", "-1", "nan", "1e5", "#", "\\n", "x\ufeff",
           "\ufeffy", "ǅ", "\U0010ffff", "\ufffd"]  # fmt: skip


@pytest.mark.parametrize("fmt", ["text", "glove", "binary"])
def test_unusual_tokens_read_back_exactly(tmp_path, fmt):
  save, load = FORMATS[fmt]
  tokens = UNUSUAL
  vectors = np.arange(len(tokens) * 2, dtype=np.float32).reshape(-1, 2) / 3
  path = tmp_path / "out"
  formats.save_word2vec(make_table(tokens, vectors), path, **save)
  check(formats.load_word2vec(path, **load), tokens, vectors)
  check(formats.load_word2vec(path), tokens, vectors)


def test_text_keeps_float32_values_exactly(tmp_path):
  patterns = np.random.default_rng(0).integers(0, 2**32, 40_000, np.uint64)
  values = patterns.astype(np.uint32).view(np.float32)
  values = values[~np.isnan(values)][:39_000].reshape(-1, 100)
  info = np.finfo(np.float32)
  values[0, :6] = [info.smallest_subnormal, -info.max, np.inf, -np.inf, -0.0,
                   1e-45]  # fmt: skip
  tokens = [f"w{i}" for i in range(len(values))]
  formats.save_word2vec(make_table(tokens, values), tmp_path / "v.txt")
  check(formats.load_word2vec(tmp_path / "v.txt"), tokens, values)


def test_text_keeps_float64_values_exactly():
  """float64 values written as Python's shortest repr parse back exactly
  when read into float64 (tables are float32 unless JAX has x64)."""
  rng = np.random.default_rng(1)
  values = rng.integers(0, 2**64, 3000, np.uint64).view(np.float64)
  values = values[np.isfinite(values)][:2000].reshape(-1, 10)
  lines = [f"w{i} {' '.join(map(repr, row.tolist()))}\n".encode()
           for i, row in enumerate(values)]  # fmt: skip
  _, rows = readers.read_text(
    lines, header=None, first_line=1, limit=None, dtype=np.dtype(np.float64)
  )
  np.testing.assert_array_equal(bits(rows), bits(values))


def allowed_token(token: str) -> bool:
  """What save_word2vec must accept, written from the docs: non-empty, no
  control character, space, U+2028/U+2029 or surrogate."""
  return bool(token) and not any(
    unicodedata.category(c) in ("Cc", "Cs") or c in " \u2028\u2029"
    for c in token
  )


@hypothesis.settings(max_examples=60, deadline=None, database=None)
@hypothesis.given(
  tokens=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=6,
                  unique=True),
  patterns=st.lists(st.integers(0, 2**32 - 1), min_size=18, max_size=18),
  dim=st.sampled_from([1, 3]),
)  # fmt: skip
def test_everything_saved_reads_back_equal(tokens, patterns, dim):
  vectors = np.array(patterns, np.uint32).view(np.float32)
  vectors = vectors[: len(tokens) * dim].reshape(len(tokens), dim)
  table = make_table(tokens, vectors)
  ok = all(allowed_token(t) for t in tokens)
  with tempfile.TemporaryDirectory() as tmp:
    for fmt in ("text", "glove", "binary"):
      save, load = FORMATS[fmt]
      path = os.path.join(tmp, fmt)
      if not ok or (fmt == "glove" and tokens[0][0] == "\ufeff"):
        with pytest.raises(ValueError, match="save_word2vec: the token of"):
          formats.save_word2vec(table, path, **save)
        continue
      formats.save_word2vec(table, path, **save)
      back = formats.load_word2vec(path, **load)
      assert back.vocabulary.tokens == tuple(tokens)
      got = np.asarray(back.rows_array())
      if fmt == "binary":  # raw float32: every bit, NaN payloads too
        np.testing.assert_array_equal(bits(got), bits(vectors))
      else:  # text writes every NaN as "nan"
        nan = np.isnan(vectors)
        np.testing.assert_array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(bits(got[~nan]), bits(vectors[~nan]))


# ------------------------------------------------ 6. what can be opened


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
  fifo = os.fspath(tmp_path / "pipe")
  os.mkfifo(fifo)
  outcome = []
  worker = threading.Thread(
    target=lambda: outcome.append(attempt(fifo)), daemon=True
  )
  worker.start()
  worker.join(10)
  if worker.is_alive():  # blocked in open(): let it go, then fail
    os.close(os.open(fifo, os.O_WRONLY))
    worker.join(10)
  assert outcome and isinstance(outcome[0], OSError), outcome
  assert f"{fifo} is a FIFO (named pipe), not a regular file" in str(outcome[0])


def test_a_device_or_a_directory_is_refused(tmp_path):
  assert "/dev/zero is a character device, not a regular file" in error_of(
    "/dev/zero"
  )
  with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
    formats.load_word2vec(tmp_path)


# ------------------------------------ fuzzing: cut, flipped, shifted bytes


NUMBER = re.compile(
  rb"[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|inf|infinity|nan)",
  re.I,
)


def reference(data: bytes, binary: bool, header: bool):
  """(tokens, float32 rows) that the bytes hold, or None if they must be
  refused: a plain reading of the grammar in docs/formats.md."""
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  count = dim = None
  if header:
    end = data.find(b"\n") + 1
    match = re.fullmatch(
      rb"[ \t]*([0-9]+)[ \t]+([0-9]+)[ \t]*\r?\n", data[:end]
    )
    if not (0 < end <= 256 and match and int(match[1]) and int(match[2])):
      return None
    count, dim, data = int(match[1]), int(match[2]), data[end:]
  found = (read_records if binary else read_lines)(data, count, dim)
  if found is None or not found[0] or len(set(found[0])) < len(found[0]):
    return None
  return found


def text_token(raw: bytes) -> str | None:
  try:
    token = raw.decode("utf-8")
  except UnicodeDecodeError:
    return None
  if token and all(unicodedata.category(c) != "Cc" for c in token):
    return token
  return None


def read_lines(data: bytes, count, dim):
  if data and not data.endswith(b"\n"):
    return None
  tokens, rows = [], []
  for line in data.split(b"\n")[:-1]:
    if line in (b"", b"\r"):
      continue
    token, space, values = line.rstrip(b"\r").rstrip(b" ").partition(b" ")
    fields = values.split(b" ")
    dim = len(fields) if dim is None else dim
    if not (space and text_token(token) and len(fields) == dim):
      return None
    if not all(NUMBER.fullmatch(field) for field in fields):
      return None
    tokens.append(text_token(token))
    rows.append([float(field) for field in fields])
  if count is not None and len(tokens) != count:
    return None
  with np.errstate(over="ignore"):
    return tokens, np.array(rows, np.float64).astype(np.float32)


def read_records(data: bytes, count, dim):
  tokens, rows, at, newline = [], [], 0, None
  for _ in range(count):
    space = data.find(b" ", at)
    token = text_token(data[at:space]) if space >= 0 else None
    vector = data[space + 1 : space + 1 + 4 * dim]
    if token is None or len(vector) < 4 * dim:
      return None
    at = space + 1 + 4 * dim
    if newline is None and at < len(data):
      newline = data[at : at + 1] == b"\n"
    if newline:
      if data[at : at + 1] != b"\n":
        return None
      at += 1
    tokens.append(token)
    rows.append(np.frombuffer(vector, "<f4"))
  return (tokens, np.array(rows)) if at == len(data) else None


def same(outcome, expected) -> bool:
  if expected is None or isinstance(outcome, Exception):
    return expected is None and isinstance(outcome, Exception)
  tokens, rows = expected
  got = np.asarray(outcome.rows_array())
  return outcome.vocabulary.tokens == tuple(tokens) and (
    got.shape == rows.shape and np.array_equal(bits(got), bits(rows))
  )


def shown(outcome) -> object:
  """An outcome for an assertion message (a table's repr is a rendering)."""
  if isinstance(outcome, ne.EmbeddingTable):
    return outcome.vocabulary.tokens, np.asarray(outcome.rows_array())
  return outcome


SAVED = {fmt: saved_bytes(fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_cut_is_refused_but_between_glove_rows(tmp_path, fmt):
  data = SAVED[fmt]
  path = os.fspath(tmp_path / "cut")
  ends = [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
  rows_before = {end: n for n, end in enumerate(ends, 1) if fmt == "glove"}
  for at in range(len(data) + 1):
    with open(path, "wb") as f:
      f.write(data[:at])
    outcome = attempt(path, **FORMATS[fmt][1])
    rows = len(TOKENS) if at == len(data) else rows_before.get(at)
    if rows is None:
      assert isinstance(outcome, (ValueError, OSError)), (at, shown(outcome))
    else:
      check(outcome, TOKENS[:rows], VECTORS[:rows])
    auto = attempt(path)
    assert same(auto, None) or same(auto, reference(data[:at], *kinds(fmt)))


def kinds(fmt: str) -> tuple[bool, bool]:
  return fmt in ("binary", "gensim"), fmt != "glove"


@st.composite
def damage(draw, data: bytes) -> bytes:
  """1 to 3 bytes flipped, set, inserted or deleted, a cut, or a header
  claiming other (up to huge) counts."""
  data = bytearray(data)
  byte = st.one_of(
    st.sampled_from(b" \n\r\t0.-e\x00\x80\xff"), st.integers(0, 255)
  )
  number = st.one_of(st.integers(0, 9), st.integers(0, 10**15))
  for _ in range(draw(st.integers(1, 3))):
    at = draw(st.integers(0, len(data)))
    how = draw(
      st.sampled_from(["flip", "set", "insert", "delete", "cut", "header"])
    )
    if how == "header":
      first = data.find(b"\n") + 1 if data[:1].isdigit() else 0
      claim = f"{draw(number)} {draw(number)}\n".encode()
      data[:first] = claim
    elif how == "insert":
      data.insert(at, draw(byte))
    elif how == "cut":
      del data[at:]
    elif at < len(data):
      if how == "flip":
        data[at] ^= 1 << draw(st.integers(0, 7))
      elif how == "set":
        data[at] = draw(byte)
      else:
        del data[at]
  return bytes(data)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@hypothesis.settings(
  max_examples=150,
  deadline=None,
  database=None,
  suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(data=st.data())
def test_damaged_files_read_as_their_bytes_say_or_fail_naming_the_file(
  tmp_path, fmt, data
):
  damaged = data.draw(damage(SAVED[fmt]))
  path = os.fspath(tmp_path / f"damaged.{fmt}")
  with open(path, "wb") as f:
    f.write(damaged)
  expected = reference(damaged, *kinds(fmt))
  outcome = attempt(path, **FORMATS[fmt][1])
  assert same(outcome, expected), (shown(outcome), expected)
  auto = attempt(path)  # detection may read it otherwise: fail or a table
  assert isinstance(auto, (Exception, ne.EmbeddingTable))


@pytest.mark.parametrize("fmt", ["binary", "gensim"])
def test_reads_in_small_pieces_give_the_same_outcomes(tmp_path, fmt):
  """The binary reader's careful path (a record across two reads) agrees
  with its short one, for every byte deleted and every cut."""
  data = SAVED[fmt]
  path = os.fspath(tmp_path / "v.bin")
  damaged = [data[:at] + data[at + 1 :] for at in range(len(data))]
  damaged += [data[:at] for at in range(0, len(data), 3)]
  for variant in damaged:
    with open(path, "wb") as f:
      f.write(variant)
    outcomes = []
    for chunk in (readers._CHUNK, 5):
      with pytest.MonkeyPatch.context() as patch:
        patch.setattr(readers, "_CHUNK", chunk)
        outcome = attempt(path, **FORMATS[fmt][1])
      outcomes.append(
        str(outcome) if isinstance(outcome, Exception) else shown(outcome)
      )
    small = outcomes[1]
    if isinstance(small, str):
      assert outcomes[0] == small, (variant, outcomes)
    else:
      assert small[0] == outcomes[0][0], variant
      np.testing.assert_array_equal(bits(small[1]), bits(outcomes[0][1]))

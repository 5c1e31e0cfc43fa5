"""Tests for `named_embed._src.files.word2vec`: word2vec text/binary and GloVe.

The input files are written byte by byte here (the binary ones with
`struct`, as the word2vec C tool writes them), independently of
`save_word2vec`, which is then checked against them.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from penzai import pz

import named_embed as ne
from named_embed import formats
from named_embed._src.files import word2vec

TOKENS = ["the", "cat", "naïve", "東京", "a\u00a0b"]  # NBSP is not a separator
VECTORS = np.array(
  [
    [0.1, -2.0, 3.5],
    [1e-8, 0.0, -0.0],
    [123456.78, -1.5, 2.25],
    [0.3, 0.2, 0.1],
    [7.0, 8.0, 9.0],
  ],
  np.float32,
)


def bits(array) -> np.ndarray:
  array = np.asarray(array)
  return array.view({2: np.uint16, 4: np.uint32}[array.dtype.itemsize])


def text_file(tmp_path, lines, name="vectors.txt", newline="\n") -> str:
  path = tmp_path / name
  path.write_bytes((newline.join(lines) + newline).encode("utf-8"))
  return os.fspath(path)


def text_lines(header=True, trailing_space=False):
  end = " " if trailing_space else ""
  lines = [
    f"{t} {' '.join(repr(float(v)) for v in row)}{end}"
    for t, row in zip(TOKENS, VECTORS)
  ]
  return ([f"{len(TOKENS)} 3"] if header else []) + lines


def binary_file(tmp_path, tokens=TOKENS, vectors=VECTORS, count=None,
                newline=True, name="vectors.bin") -> str:  # fmt: skip
  count = len(tokens) if count is None else count
  data = f"{count} {vectors.shape[1]}\n".encode()
  for token, row in zip(tokens, vectors):
    token = token if isinstance(token, bytes) else token.encode("utf-8")
    data += token + b" " + struct.pack(f"<{len(row)}f", *row)
    data += b"\n" if newline else b""
  path = tmp_path / name
  path.write_bytes(data)
  return os.fspath(path)


def check(table, tokens=TOKENS, vectors=VECTORS):
  assert table.vocabulary.tokens == tuple(tokens)
  assert table.vocabulary.roles == {}
  assert table.embedding_axes == {"embedding": vectors.shape[1]}
  np.testing.assert_array_equal(bits(table.rows_array()), bits(vectors))


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("header", [True, False], ids=["word2vec", "glove"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_text_with_and_without_header(tmp_path, header, newline):
  path = text_file(tmp_path, text_lines(header, True), newline=newline)
  check(formats.load_word2vec(path))
  check(formats.load_word2vec(path, no_header=not header, binary=False))


def test_utf8_bom_and_blank_lines_are_skipped(tmp_path):
  path = tmp_path / "bom.txt"
  path.write_bytes(b"\xef\xbb\xbf" + "\n".join(text_lines()).encode() + b"\n\n")
  check(formats.load_word2vec(path))


@pytest.mark.parametrize("newline", [True, False])
def test_binary_with_and_without_newlines(tmp_path, newline):
  path = binary_file(tmp_path, newline=newline)
  check(formats.load_word2vec(path))
  check(formats.load_word2vec(path, binary=True))


def test_limit_reads_the_first_vectors(tmp_path):
  for path in [
    text_file(tmp_path, text_lines(True), "a.txt"),
    text_file(tmp_path, text_lines(False), "b.txt"),
    binary_file(tmp_path),
  ]:
    check(formats.load_word2vec(path, limit=2), TOKENS[:2], VECTORS[:2])
    check(formats.load_word2vec(path, limit=50))
  with pytest.raises(ValueError, match="`limit` must be a positive int"):
    formats.load_word2vec(path, limit=0)


def test_options_dtype_axes_and_freeze(tmp_path):
  path = text_file(tmp_path, text_lines())
  table = formats.load_word2vec(
    path,
    dtype=ml_dtypes.bfloat16,
    vocabulary_axis="word",
    embedding_axis="dim",
    freeze=False,
    name="glove",
  )
  assert table.dtype == ml_dtypes.bfloat16
  assert list(table.value.named_axes) == ["word", "dim"]
  assert table.embeddings.label == "glove.embeddings"
  np.testing.assert_array_equal(
    bits(table.rows_array()), bits(VECTORS.astype(ml_dtypes.bfloat16))
  )
  with pytest.raises(TypeError, match="`dtype` must be a floating dtype"):
    formats.load_word2vec(path, dtype=np.int32)


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize(
  "dtype", [np.float32, ml_dtypes.bfloat16, np.float16], ids=str
)
@pytest.mark.parametrize(
  "binary, header", [(False, True), (False, False), (True, True)]
)
def test_save_load_round_trip_is_exact(tmp_path, dtype, binary, header):
  rows = np.random.default_rng(0).normal(size=(50, 7)).astype(dtype)
  info = ml_dtypes.finfo(dtype)
  rows[0, :5] = [info.max, -np.inf, info.smallest_subnormal, -0.0, np.inf]
  tokens = [f"w{i}" for i in range(50)]
  table = ne.EmbeddingTable.from_pretrained(rows).with_vocabulary(
    ne.Vocabulary(tokens)
  )
  path = tmp_path / "out.vec"
  formats.save_word2vec(table, path, binary=binary, header=header)
  check(formats.load_word2vec(path, dtype=dtype), tokens, rows)
  check(formats.load_word2vec(path), tokens, rows.astype(np.float32))


def test_saved_files_match_the_reference_layouts(tmp_path):
  table = ne.EmbeddingTable.from_pretrained(VECTORS).with_vocabulary(
    ne.Vocabulary(TOKENS)
  )
  formats.save_word2vec(table, tmp_path / "out.bin", binary=True)
  reference = binary_file(tmp_path)
  with open(reference, "rb") as f:
    assert (tmp_path / "out.bin").read_bytes() == f.read()
  formats.save_word2vec(table, tmp_path / "glove.txt", header=False)
  lines = (tmp_path / "glove.txt").read_text(encoding="utf-8").splitlines()
  assert lines[0] == "the 0.1 -2.0 3.5"
  assert lines[1] == "cat 1e-08 0.0 -0.0"
  assert len(lines) == len(TOKENS)


def test_nan_survives_text(tmp_path):
  rows = np.array([[np.nan, 1.0]], np.float32)
  table = ne.EmbeddingTable.from_pretrained(rows).with_vocabulary(
    ne.Vocabulary(["x"])
  )
  formats.save_word2vec(table, tmp_path / "nan.txt")
  loaded = formats.load_word2vec(tmp_path / "nan.txt")
  assert np.isnan(np.asarray(loaded.rows_array())[0, 0])


# ---------------------------------------------------------------- refusals


def test_save_refuses_what_word2vec_cannot_hold(tmp_path):
  rows = np.ones((2, 3), np.float32)
  plain = ne.EmbeddingTable.from_pretrained(rows)
  with pytest.raises(ValueError, match="has no vocabulary. Attach one"):
    formats.save_word2vec(plain, tmp_path / "x.txt")
  spaced = plain.with_vocabulary(ne.Vocabulary(["ok", "a b"]))
  with pytest.raises(ValueError, match="row 1, 'a b', contains a space at"):
    formats.save_word2vec(spaced, tmp_path / "x.txt")
  empty = plain.with_vocabulary(ne.Vocabulary(["", "b"]))
  with pytest.raises(ValueError, match="row 0, '', is empty"):
    formats.save_word2vec(empty, tmp_path / "x.txt")
  fine = plain.with_vocabulary(ne.Vocabulary(["a", "b"]))
  with pytest.raises(ValueError, match="binary files always start with"):
    formats.save_word2vec(fine, tmp_path / "x.bin", binary=True, header=False)
  multi = ne.EmbeddingTable.from_pretrained(
    np.ones((2, 2, 3), np.float32), embedding_axes=("h", "d")
  ).with_vocabulary(ne.Vocabulary(["a", "b"]))
  with pytest.raises(ValueError, match="2 embedding axes .* Flatten them"):
    formats.save_word2vec(multi, tmp_path / "x.txt")
  assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  table = ne.EmbeddingTable.from_pretrained(VECTORS).with_vocabulary(
    ne.Vocabulary(TOKENS)
  )
  path = tmp_path / "vectors.txt"
  formats.save_word2vec(table, path)
  before = path.read_bytes()

  def failing(f, tokens, rows):
    f.write(b"the 0.1")
    raise OSError("disk full")

  monkeypatch.setattr(word2vec, "_write_text", failing)
  with pytest.raises(OSError, match="disk full"):
    formats.save_word2vec(table, path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["vectors.txt"]


# ------------------------------------------------------------------ errors


def load_text(tmp_path, lines, **kwargs):
  return formats.load_word2vec(text_file(tmp_path, lines), **kwargs)


@pytest.mark.parametrize(
  "lines, message",
  [
    (["2 3", "a 1 2 3", "b 1 2"], "line 3: expected 3 values after the"
     " token 'b', got 2"),
    (["2 3", "a 1 2 3", "b 1 2 3 4"], "line 3: expected 3 values .* got 4."
     r" \(A token cannot contain spaces.\)"),
    (["a 1 2 3", "b 1 2"], "line 2: expected 3 values"),
    (["2 3", "a 1 2 3", "b 1 x 3"], "line 3: value 2 of token 'b' is 'x',"
     " which is not a number"),
    (["a 1  2"], "line 1: value 2 of token 'a' is '', which is not a number"),
    (["3 3", "a 1 2 3", "b 1 2 3"], r"the header \(line 1\) announces 3"
     " vectors, but the file ends after 2, on line 3"),
    (["1 3", "a 1 2 3", "b 1 2 3"], r"line 3: the header \(line 1\)"
     " announces 1 vectors, but the file has more lines"),
    (["2 3", "a 1 2 3", "a 4 5 6"], "line 3: token 'a' appears twice"
     " \\(first on line 2\\)"),
    (["0 3"], "line 1: the header b'0 3' announces no data"),
    (["a"], "line 1: token 'a' has no values"),
    (["2 3"], r"the header \(line 1\) announces 2 vectors, but the file"
     " ends after 0, on line 1: is it truncated"),
  ],
)  # fmt: skip
def test_bad_text_names_the_line_and_the_problem(tmp_path, lines, message):
  with pytest.raises(ValueError, match="vectors.txt: " + message):
    load_text(tmp_path, lines)


def test_non_utf8_text_line(tmp_path):
  path = tmp_path / "bad.txt"
  path.write_bytes(b"2 2\nok 1 2\nbad\xff 1 2\n")
  with pytest.raises(
    ValueError, match=r"line 3: not valid UTF-8 \(invalid start byte at byte 3"
  ):
    formats.load_word2vec(path, binary=False)


def test_header_options_are_checked(tmp_path):
  with pytest.raises(ValueError, match="line 1: expected the word2vec text"
                     " header .* pass no_header=True for GloVe"):  # fmt: skip
    load_text(tmp_path, text_lines(header=False), no_header=False)
  with pytest.raises(ValueError, match="expected the word2vec binary header"):
    load_text(tmp_path, text_lines(header=False), binary=True)
  with pytest.raises(ValueError, match="the file is empty"):
    formats.load_word2vec(text_file(tmp_path, [], newline=""))
  with pytest.raises(FileNotFoundError):
    formats.load_word2vec(tmp_path / "missing.txt")


def test_header_read_as_data_with_no_header_true(tmp_path):
  path = text_file(tmp_path, text_lines(header=True))
  with pytest.raises(ValueError, match="line 2: expected 1 values"):
    formats.load_word2vec(path, no_header=True)


def test_bad_binary_token_is_reported_with_its_record(tmp_path):
  path = binary_file(tmp_path, tokens=["ok", b"caf\xe9", "x", "y", "z"])
  with pytest.raises(
    ValueError,
    match=r"vectors.bin: record 2 \(byte 20\): the token b'caf\\xe9' is"
    r" not valid UTF-8 \(unexpected end of data at byte 3 of the token\)",
  ):
    formats.load_word2vec(path)


def test_truncated_binary(tmp_path):
  path = binary_file(tmp_path)
  with open(path, "rb") as f:
    data = f.read()
  for cut in (5, 20, len(data) - 3):
    with open(path, "wb") as f:
      f.write(data[:cut])
    with pytest.raises(ValueError, match="the file ends inside it.* truncated"):
      formats.load_word2vec(path, binary=True)


def test_binary_count_mismatch(tmp_path):
  more = binary_file(tmp_path, count=4, name="more.bin")
  with pytest.raises(ValueError, match="announces 4 vectors, but more data"):
    formats.load_word2vec(more)
  fewer = binary_file(tmp_path, count=6, name="fewer.bin")
  with pytest.raises(ValueError, match="record 6 .* the file ends inside it"):
    formats.load_word2vec(fewer)
  duplicate = binary_file(tmp_path, tokens=["a", "b", "a", "c", "d"])
  with pytest.raises(ValueError, match="record 3: token 'a' appears twice"):
    formats.load_word2vec(duplicate)


def test_errors_say_when_the_layout_was_guessed(tmp_path):
  path = binary_file(tmp_path, newline=True, count=6)
  with pytest.raises(
    ValueError,
    match="detected as word2vec binary; pass binary=False if it is text",
  ):
    formats.load_word2vec(path)
  with pytest.raises(ValueError) as caught:
    formats.load_word2vec(path, binary=True)
  assert "detected" not in str(caught.value)
  with pytest.raises(ValueError) as caught:  # text: no guess worth a note
    load_text(tmp_path, ["2 3", "a 1 2 3", "b 1 2"])
  assert "detected" not in str(caught.value)


# ---------------------------------------------------------------- progress


class Terminal(io.StringIO):
  """A stderr that says it is a terminal."""

  def isatty(self) -> bool:
    return True


def test_progress_bar_on_a_terminal_for_large_files_or_on_request(
  tmp_path, monkeypatch
):
  path = text_file(tmp_path, text_lines())

  def shown(**kwargs) -> str:
    monkeypatch.setattr(sys, "stderr", Terminal())
    formats.load_word2vec(path, **kwargs)
    return sys.stderr.getvalue()

  assert shown() == ""
  bar = shown(progress=True)  # tqdm's, redrawn in place
  assert bar.startswith("\rvectors.txt:   0%|") and bar.endswith("\n")
  assert bar.rstrip().split("\r")[-1].startswith("vectors.txt: 100%|")
  monkeypatch.setattr(word2vec, "LARGE_FILE_BYTES", 10)
  assert "100%" in shown()
  assert shown(progress=False) == ""


def test_progress_into_a_log_is_plain_lines_on_request_only(
  tmp_path, capsys, monkeypatch
):
  path = text_file(tmp_path, text_lines())
  monkeypatch.setattr(word2vec, "LARGE_FILE_BYTES", 10)
  formats.load_word2vec(path)  # large, but stderr is not a terminal
  formats.load_word2vec(path, progress=False)
  assert capsys.readouterr() == ("", "")
  formats.load_word2vec(path, progress=True)
  lines = capsys.readouterr().err.splitlines(keepends=True)
  assert [line[:18] for line in lines] == [
    "vectors.txt:   0% ",  # when it starts
    "vectors.txt: 100% ",  # at the end
  ]
  assert all(line.endswith("]\n") and "\r" not in line for line in lines)


def test_progress_lines_in_a_log_are_periodic(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(word2vec, "LOG_LINE_SECONDS", 0.0)
  rows = [f"w{i} {i} 1.5" for i in range(3000)]
  formats.load_word2vec(text_file(tmp_path, rows), progress=True)
  lines = capsys.readouterr().err.splitlines()
  percents = [int(line.split(":")[1].split("%")[0]) for line in lines]
  assert len(lines) >= 4 and percents == sorted(percents)  # every 1024 rows
  assert percents[0] == 0 and percents[-1] == 100


def test_progress_ends_its_line_when_reading_fails(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "stderr", Terminal())
  with pytest.raises(ValueError, match="line 3"):
    load_text(tmp_path, ["2 3", "a 1 2 3", "b 1 2"], progress=True)
  assert sys.stderr.getvalue().endswith("\n")


PIPED = """
import sys
from named_embed import formats
from named_embed._src.files import word2vec

word2vec.LARGE_FILE_BYTES = 0  # every file is large
for path in sys.argv[1:]:
  formats.load_word2vec(path)
  print("default done", file=sys.stderr, flush=True)
  formats.load_word2vec(path, progress=True)
"""


def test_progress_piped_to_another_process_has_no_carriage_return(tmp_path):
  paths = [text_file(tmp_path, text_lines()), binary_file(tmp_path)]
  run = subprocess.run(
    [sys.executable, "-c", PIPED, *paths],
    capture_output=True,  # pipes, not terminals
    check=True,
    timeout=120,
  )
  err = run.stderr.decode()
  assert "\r" not in err
  ours = [line for line in err.splitlines() if line.startswith(("v", "d"))]
  assert [line[:18] for line in ours] == [
    "default done",  # nothing, although the file counts as large
    "vectors.txt:   0% ",
    "vectors.txt: 100% ",
    "default done",
    "vectors.bin:   0% ",
    "vectors.bin: 100% ",
  ]


# ------------------------------------------------- compressed and adapted


def adapted_kinds(table):
  """Every kind over ``table``, the adapters moved off their start."""
  lora = table.quantized("int8").with_lora(
    1, name="e", init_base_rng=jax.random.key(0)
  )
  a = np.linspace(-1, 1, table.num_rows, dtype=np.float32)[:, None]
  lora.lora_a.value = pz.nx.wrap(a).tag("vocabulary", "rank")
  rows = table.with_trainable_rows([1, 3], name="r")
  rows.rows.value = pz.nx.wrap(np.full((2, 3), 0.5, np.float32)).tag(
    "rows", "embedding"
  )
  q = table.quantized("int8")
  return {
    "int8": (q, q.dequantized()),
    "lora": (lora, lora.merged()),
    "rows": (rows, rows.merged()),
  }


@pytest.mark.parametrize("kind", ["int8", "lora", "rows"])
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_every_kind_saves_its_token_rows_as_read(tmp_path, kind, binary):
  table = (
    ne.EmbeddingTable.from_pretrained(VECTORS)
    .with_vocabulary(ne.Vocabulary(TOKENS))
    .padded_to_multiple(4)
  )
  adapted, ref = adapted_kinds(table)[kind]
  path = tmp_path / "vectors.bin"
  formats.save_word2vec(adapted, path, binary=binary)
  back = formats.load_word2vec(path, binary=binary)
  assert back.vocabulary.tokens == tuple(TOKENS)
  want = np.asarray(ref.token_rows())
  assert bits(back.rows_array()).tobytes() == bits(want).tobytes()
  assert not np.array_equal(want, VECTORS)  # the rows as read, not the base


def test_save_refuses_what_is_not_a_table(tmp_path):
  with pytest.raises(TypeError, match="ne.save_word2vec: `table` must be"):
    formats.save_word2vec(VECTORS, tmp_path / "x.txt")
  layer = ne.EmbeddingLookup(ne.EmbeddingTable.from_pretrained(VECTORS))
  with pytest.raises(TypeError, match="pass its table"):
    formats.save_word2vec(layer, tmp_path / "x.txt")
  assert os.listdir(tmp_path) == []

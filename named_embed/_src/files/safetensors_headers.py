"""safetensors headers, checked as the safetensors library checks them.

A safetensors file is an 8-byte little-endian header length, a JSON
header of that length, and the tensors' bytes. `read_header` checks a
length within the file (and at most `MAX_HEADER_BYTES`), a UTF-8 JSON
object, string metadata (``__metadata__``), and tensors whose byte ranges
follow one another from the start of the data and fill it exactly, each
the size its shape and dtype need; shapes numpy can hold. Every failure
is a `ValueError` naming the file.

Why not ``safetensors.safe_open``: it memory-maps the file, so another
program rewriting the file in place (``cp`` over it, ``rsync --inplace``)
kills the reader with ``SIGBUS``, and it reports damage as a bare
``SafetensorError``. Files are written with the safetensors library
(`directory_saves.write_tensor_file`); `tensor_files` reads them with
positioned reads from one open descriptor, and this module checks their
headers first. ``tests/fuzz_table_files_test.py`` compares what is read
with what the safetensors library decodes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

MAX_HEADER_BYTES = 100_000_000
"""The largest header read (the safetensors library's own limit)."""

_MAX_RANK = 32  # numpy's least maximum number of dimensions
_MAX_ELEMENTS = 1 << 62  # beyond it numpy refuses the shape

# safetensors' dtype names (its header's "dtype") -> numpy dtypes
DTYPES = {
  "BOOL": np.dtype(np.bool_),
  "U8": np.dtype(np.uint8),
  "I8": np.dtype(np.int8),
  "U16": np.dtype(np.uint16),
  "I16": np.dtype(np.int16),
  "U32": np.dtype(np.uint32),
  "I32": np.dtype(np.int32),
  "U64": np.dtype(np.uint64),
  "I64": np.dtype(np.int64),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F32": np.dtype(np.float32),
  "F64": np.dtype(np.float64),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

Entry = tuple[str, tuple[int, ...], int, int]
"""A tensor's dtype name, shape, first and end byte (from the file's
start)."""


def _invalid(path: str, why: str) -> ValueError:
  return ValueError(
    f"{path} is not a valid safetensors file ({why}). It may be truncated"
    " (an interrupted download or copy) or not a safetensors file at all."
  )


def read_header(
  path: str, read_into: Callable[[memoryview, int], int], size: int
) -> tuple[dict[str, str], dict[str, Entry]]:
  """The metadata and entries of the header of the file ``path`` of
  ``size`` bytes, checked; ``read_into(view, offset)`` reads its bytes.

  Raises:
    ValueError: naming ``path``, for any header safetensors would refuse.

  >>> raw = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
  >>> data = len(raw).to_bytes(8, "little") + raw + bytes(4)
  >>> def read_into(view, offset):
  ...   view[:] = data[offset : offset + len(view)]
  ...   return len(view)
  >>> read_header("w.safetensors", read_into, len(data))
  ({}, {'w': ('F32', (1,), 62, 66)})
  >>> read_header("w.safetensors", read_into, 7)[0]
  Traceback (most recent call last):
  ...
  ValueError: w.safetensors is not a valid safetensors file (it has 7 bytes, not even a header length). It may be truncated (an interrupted download or copy) or not a safetensors file at all.
  """
  if size < 8:
    raise _invalid(path, f"it has {size} bytes, not even a header length")
  length = bytearray(8)
  if _read_exactly(read_into, length, 0) != 8:
    raise _invalid(path, "it ended while its header length was read")
  (count,) = struct.unpack("<Q", length)
  if count > min(size - 8, MAX_HEADER_BYTES):
    raise _invalid(
      path,
      f"its header would take {count:,} bytes, but it has {size - 8:,}"
      f" after the header length (headers are at most {MAX_HEADER_BYTES:,})",
    )
  raw = bytearray(count)
  if _read_exactly(read_into, raw, 8) != count:
    raise _invalid(path, "it ended while its header was read")
  try:
    header = json.loads(raw.decode("utf-8"))
  except (ValueError, RecursionError) as error:
    why = "nested too deeply" if isinstance(error, RecursionError) else error
    raise _invalid(path, f"its header is not UTF-8 JSON: {why}") from None
  if not isinstance(header, dict):
    raise _invalid(path, "its header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(
    isinstance(v, str) for v in metadata.values()
  ):
    raise _invalid(path, "its __metadata__ is not an object of strings")
  entries = {n: _entry(path, n, e, 8 + count) for n, e in header.items()}
  _check_offsets(path, entries, 8 + count, size)
  return metadata, entries


def _read_exactly(read_into, buffer: bytearray, offset: int) -> int:
  """Fills ``buffer`` from ``offset`` (short reads continued); the bytes
  read, fewer at the end of the file."""
  view, done = memoryview(buffer), 0
  while done < len(buffer):
    got = read_into(view[done:], offset + done)
    if not got:
      break
    done += got
  return done


def _shown(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _entry(path: str, name: str, entry: Any, data: int) -> Entry:
  """One tensor's checked header entry, its offsets made absolute."""
  where = f"tensor {_shown(name)}"
  if not isinstance(entry, dict):
    raise _invalid(
      path, f"{where} is described by {_shown(entry)}, not an object"
    )
  dtype, shape = entry.get("dtype"), entry.get("shape")
  offsets = entry.get("data_offsets")
  if not isinstance(dtype, str):
    raise _invalid(path, f"{where} has no dtype name")
  if not _ints(shape) or len(shape) > _MAX_RANK:
    raise _invalid(path, f"{where} has the shape {_shown(shape)}")
  if math.prod(max(n, 1) for n in shape) >= _MAX_ELEMENTS:
    raise _invalid(path, f"{where} has the shape {_shown(shape)}: too large")
  if not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
    raise _invalid(path, f"{where} has the data offsets {_shown(offsets)}")
  begin, end = offsets
  if dtype in DTYPES:
    needed = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != needed:
      raise _invalid(
        path,
        f"{where} of shape {list(shape)} and dtype {dtype} needs {needed:,}"
        f" bytes, but its data offsets {offsets} hold {end - begin:,}",
      )
  return dtype, tuple(shape), data + begin, data + end


def _ints(value: Any) -> bool:
  return isinstance(value, list) and all(
    type(n) is int and n >= 0 for n in value
  )


def _check_offsets(path: str, entries: dict[str, Entry], data: int, size: int):
  """The tensors' bytes must follow one another and fill the data."""
  end = data
  for name, (_, _, first, last) in sorted(
    entries.items(), key=lambda item: item[1][2:]
  ):
    if first != end:
      raise _invalid(
        path,
        f"tensor {_shown(name)} starts at byte {first - data} of the data, where"
        f" the tensors before it end at {end - data}",
      )
    end = last
  if end != size:
    raise _invalid(
      path,
      f"its tensors end at byte {end:,}, but the file has {size:,} bytes",
    )

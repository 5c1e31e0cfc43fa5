"""safetensors files opened once: a checked header, then positioned reads.

`open_file` opens a file once and keeps it open: its header, its metadata
and every tensor read later come from that one open file, so a file
renamed over the path meanwhile (another `ne.save`) is never mixed with
the one first opened. Before reading anything it checks that the path is
a regular file (a FIFO is opened without waiting for a writer, then
refused; ``/dev/zero`` is refused), and it reads no more than the file's
size, so a hostile path can neither hang a reader nor fill its memory.

The header is checked as the safetensors library checks it
(`named_embed._src.files.safetensors_headers`), read from the open file.

Tensors are read with positioned reads (``preadv``) straight into the
caller's array, never through a memory map: a file truncated or rewritten
in place by another program while it is read (``cp`` over it, ``rsync
--inplace``) gives a `ValueError` naming it, where a memory map would
kill the process with ``SIGBUS``. A change seen after a read (its size or
modification time differ from when it was opened) is refused the same
way. Replace files by writing elsewhere and renaming (`ne.save` does).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from named_embed._src.base import regular_files
from named_embed._src.files import safetensors_headers
from named_embed._src.files.safetensors_headers import DTYPES

_PREADV = getattr(os, "preadv", None)  # missing on Windows

ALIGNMENT = 64
"""Bytes the arrays read are aligned to (what XLA's CPU client needs to use
a host buffer in place)."""

CHUNK_BYTES = 16 << 20
"""Bound of the buffer of a region that is not contiguous in its file (cut
along a non-leading axis)."""


class Descriptor:
  """An open file descriptor, closed by `close` or when garbage collected
  (without the `ResourceWarning` of an unclosed Python file object).

  >>> import tempfile
  >>> with tempfile.NamedTemporaryFile() as f:
  ...   handle = Descriptor(os.open(f.name, os.O_RDONLY))
  ...   handle.close(); handle.fd
  -1
  """

  def __init__(self, fd: int, path: str = "?"):
    self.fd, self.path = fd, path
    self._lock = threading.Lock()  # for platforms without `os.preadv`

  def close(self, _close=os.close) -> None:  # bound: usable at shutdown
    """Closes the descriptor (once)."""
    fd, self.fd = self.fd, -1
    if fd >= 0:
      _close(fd)

  def __del__(self):
    self.close()

  def read_into(self, view: memoryview, offset: int) -> int:
    """Reads up to ``len(view)`` bytes at ``offset``; the count read.

    Raises:
      OSError: naming the file, if reading fails.
    """
    try:
      if _PREADV is not None:
        return _PREADV(self.fd, [view], offset)
      with self._lock:  # Windows: no positioned reads
        os.lseek(self.fd, offset, os.SEEK_SET)
        with io.FileIO(self.fd, "rb", closefd=False) as f:
          return f.readinto(view) or 0
    except OSError as error:
      raise OSError(
        error.errno,
        f"Cannot read {self.path} at byte {offset}: {error.strerror}",
        self.path,
      ) from None


def open_regular(path: str, what: str) -> tuple[Descriptor, os.stat_result]:
  """``path`` opened for reading, after checking it is a regular file.

  A FIFO is opened without blocking (``O_NONBLOCK``) and refused, as is
  a device, a directory or a socket; symbolic links are followed.

  Raises:
    FileNotFoundError: naming ``what`` and ``path``, if it is missing.
    OSError: if it cannot be opened.
    OSError: if it is not a regular file (`regular_files.open_fd`).

  >>> open_regular("/dev/null", "checkpoint index")
  Traceback (most recent call last):
  ...
  OSError: /dev/null is a character device, not a regular file: cannot read it as a checkpoint index.
  """
  try:
    fd, info = regular_files.open_fd(path, f"a {what}")
  except FileNotFoundError:
    raise FileNotFoundError(
      errno.ENOENT, f"No {what} at {path}", path
    ) from None
  except OSError as error:
    if error.errno is None:  # not a regular file: the message says so
      raise
    raise type(error)(
      error.errno, f"Cannot open the {what} {path}: {error.strerror}", path
    ) from None
  handle = Descriptor(fd, path)
  return handle, info


def parse_json(path: str, data: bytes, what: str) -> Any:
  """The JSON value of ``data`` (UTF-8), read from ``path``.

  Raises:
    ValueError: naming ``path``, for bytes that are not UTF-8 or not JSON
      (nesting too deep for Python's parser included).

  >>> parse_json("i.json", b"[" * 100_000, "checkpoint index")
  Traceback (most recent call last):
  ...
  ValueError: i.json is not valid JSON: it nests arrays or objects too deeply to be a checkpoint index.
  """
  try:
    return json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as error:
    raise ValueError(
      f"{path} is not valid JSON: byte {error.start} is not UTF-8."
    ) from None
  except RecursionError:
    raise ValueError(
      f"{path} is not valid JSON: it nests arrays or objects too deeply to"
      f" be a {what}."
    ) from None
  except ValueError as error:  # json.JSONDecodeError, too-long integers
    raise ValueError(f"{path} is not valid JSON: {error}") from None


Entry = safetensors_headers.Entry


@dataclasses.dataclass(frozen=True, eq=False)
class SafetensorsFile:
  """A safetensors file open for reading, its header checked.

  Attributes:
    path: The path it was opened by.
    metadata: Its string metadata (``__metadata__``).
    entries: Tensor name -> (safetensors dtype name, shape, first byte, end
      byte), counted from the file's start, in the header's order.
    handle: The open file.
    identity: Its size and modification time when opened.
  """

  path: str
  metadata: dict[str, str]
  entries: dict[str, Entry]
  handle: Descriptor = dataclasses.field(repr=False)
  identity: tuple[int, int] = dataclasses.field(repr=False)

  @property
  def names(self) -> list[str]:
    """The tensor names, in the header's order."""
    return list(self.entries)

  def close(self) -> None:
    """Closes the file (it also closes when garbage collected)."""
    self.handle.close()

  def shape_of(self, name: str) -> tuple[int, ...]:
    """The shape of tensor ``name``."""
    return self.entries[name][1]

  def dtype_of(self, name: str) -> np.dtype:
    """The numpy dtype of tensor ``name``.

    Raises:
      ValueError: for a safetensors dtype named_embed does not read.
    """
    code = self.entries[name][0]
    if code not in DTYPES:
      raise ValueError(
        f"{self.path}, tensor {name!r} has the safetensors dtype {code!r},"
        f" which named_embed does not read (it reads {sorted(DTYPES)})."
      )
    return DTYPES[code]

  def read_region(self, name: str, local: Sequence[tuple[int, int]], out):
    """Reads ``[start, stop)`` per dimension of tensor ``name`` into the
    array ``out`` (of that region's shape), reading only its rows."""
    shape = self.shape_of(name)
    itemsize = self.dtype_of(name).itemsize
    first = self.entries[name][2]
    row_bytes = math.prod(shape[1:]) * itemsize  # one index of dim 0
    low, high = local[0] if local else (0, 1)
    whole_rows = all(
      a == 0 and b == n for (a, b), n in zip(local[1:], shape[1:])
    )
    if whole_rows and out.flags.c_contiguous:  # one run of the file
      read_into(self, first + low * row_bytes, out, self.path)
    else:
      step = max(1, CHUNK_BYTES // max(row_bytes, 1))
      inner = tuple(slice(a, b) for a, b in local[1:])
      for row in range(low, high, step):
        rows = min(step, high - row)
        chunk = np.empty((rows, *shape[1:]), out.dtype)
        read_into(self, first + row * row_bytes, chunk, self.path)
        out[row - low : row - low + rows] = chunk[(slice(None), *inner)]
    self.check_unchanged()

  def check_unchanged(self) -> None:
    """Raises if the file's size or modification time changed since it was
    opened (another program wrote into it)."""
    info = os.fstat(self.handle.fd)
    if (info.st_size, info.st_mtime_ns) != self.identity:
      raise ValueError(
        f"{self.path} changed while it was being read (another program"
        " wrote into it in place, e.g. `cp` or `rsync --inplace` over it), so"
        " what was read may mix two versions. Replace such files by writing"
        " elsewhere and renaming (ne.save does), then read again."
      )


def read_into(f: SafetensorsFile, offset: int, out: np.ndarray, path: str):
  """Fills the C-contiguous ``out`` with the file's bytes from ``offset``."""
  view = memoryview(out.reshape(-1).view(np.uint8))
  done = 0
  while done < len(view):
    got = f.handle.read_into(view[done:], offset + done)
    if not got:
      raise ValueError(
        f"{path} ended at byte {offset + done} while reading a tensor: it"
        " was truncated after it was opened."
      )
    done += got


def open_file(path: str) -> SafetensorsFile:
  """Opens the safetensors file ``path`` and checks its header.

  Raises:
    FileNotFoundError: if it is missing.
    ValueError: if it is not a regular file or not a valid safetensors file
      (the message names it and says what is wrong).

  >>> import os, tempfile, numpy as np
  >>> from safetensors.numpy import save_file
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "m.safetensors")
  ...   save_file({"w": np.ones((2, 3), np.float32)}, path, {"a": "b"})
  ...   f = open_file(path)
  ...   f.metadata, f.entries["w"][:2]
  ({'a': 'b'}, ('F32', (2, 3)))
  """
  handle, info = open_regular(path, "safetensors file")
  try:
    metadata, entries = safetensors_headers.read_header(
      path, handle.read_into, info.st_size
    )
  except BaseException:
    handle.close()
    raise
  identity = (info.st_size, info.st_mtime_ns)
  return SafetensorsFile(path, metadata, entries, handle, identity)


def allocate(shape, dtype, where: Callable[[], str]) -> np.ndarray:
  """`aligned_empty`, or an `OSError` naming ``where()`` if it does not fit
  in memory.

  >>> allocate((2, 3), np.float32, lambda: "t.safetensors").shape
  (2, 3)
  """
  try:
    return aligned_empty(shape, dtype)
  except MemoryError:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raise OSError(
      errno.ENOMEM,
      f"Cannot read {where()}: its {nbytes:,} bytes do not fit in memory."
      " Load it with a mesh, so that each process reads its share only.",
    ) from None


def aligned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
  """An uninitialised C-order array whose data starts at a multiple of
  `ALIGNMENT` bytes (numpy's own allocations are 16-byte aligned).

  >>> aligned_empty((3, 5), np.float32).ctypes.data % ALIGNMENT
  0
  """
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + ALIGNMENT, np.uint8)
  skip = -raw.ctypes.data % ALIGNMENT
  return raw[skip : skip + nbytes].view(dtype).reshape(shape)

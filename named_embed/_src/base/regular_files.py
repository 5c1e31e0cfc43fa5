"""Reading a whole small file, only if it is a regular file.

A reader given a path cannot trust what is there: a symbolic link to
``/dev/zero`` never ends, a FIFO blocks forever on open, a directory is not
a file. `read_regular` opens without blocking, checks the open file (not
the path, which could change in between) is a regular file, and reads
exactly the bytes it holds, so its cost is bounded by the file's real size.
"""

from __future__ import annotations

import os
import stat

_KINDS = (
  (stat.S_ISDIR, "a directory"),
  (stat.S_ISFIFO, "a FIFO (named pipe)"),
  (stat.S_ISCHR, "a character device"),
  (stat.S_ISBLK, "a block device"),
  (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
  """What a file of ``st_mode`` ``mode`` is, in words.

  >>> import stat
  >>> kind_of(stat.S_IFIFO)
  'a FIFO (named pipe)'
  """
  for test, name in _KINDS:
    if test(mode):
      return name
  return "not a regular file"


def open_fd(
  path: str | os.PathLike[str], what: str
) -> tuple[int, os.stat_result]:
  """``path`` opened for reading (a descriptor, in blocking mode) and its
  `os.fstat`, after checking the open file is a regular file.

  A FIFO is opened without blocking (``O_NONBLOCK``), so one without a
  writer is refused at once instead of hanging; the type is checked on
  the open file, not the path, so a rename in between cannot fool it.

  Raises:
    FileNotFoundError: if nothing is at ``path``.
    IsADirectoryError: if ``path`` is a directory.
    OSError: if ``path`` is a FIFO, device or socket (named, with what it
      is), or cannot be opened.

  >>> open_fd("/dev/zero", "a vocab.txt")
  Traceback (most recent call last):
  ...
  OSError: /dev/zero is a character device, not a regular file: cannot read it as a vocab.txt.
  """
  path = os.fspath(path)
  nonblocking = getattr(os, "O_NONBLOCK", 0)
  fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      error = IsADirectoryError if stat.S_ISDIR(info.st_mode) else OSError
      raise error(
        f"{path} is {kind_of(info.st_mode)}, not a regular file: cannot"
        f" read it as {what}.",
      )
    if nonblocking:
      os.set_blocking(fd, True)
    return fd, info
  except BaseException:
    os.close(fd)
    raise


def read_regular(
  path: str | os.PathLike[str], what: str, limit: int | None = None
) -> bytes:
  """The bytes of the regular file ``path`` (see `open_fd`), exactly as
  many as it holds.

  Args:
    path: The file.
    what: What the file should be, for messages (e.g. ``"a vocab.txt"``).
    limit: If given, files larger than this many bytes are refused.

  Raises:
    FileNotFoundError: if nothing is at ``path``.
    OSError: if ``path`` is not a regular file or cannot be read.
    ValueError: if it is larger than ``limit``.

  Example:

  >>> import os, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "a.txt")
  ...   with open(path, "wb") as f:
  ...     _ = f.write(b"hello")
  ...   print(read_regular(path, "a text file"))
  ...   try:
  ...     read_regular(tmp, "a text file")
  ...   except OSError as error:
  ...     print(str(error).replace(tmp, "tmp"))
  b'hello'
  tmp is a directory, not a regular file: cannot read it as a text file.
  """
  path = os.fspath(path)
  fd, info = open_fd(path, what)
  try:
    if limit is not None and info.st_size > limit:
      raise ValueError(
        f"{path} is {info.st_size:,} bytes, more than the {limit:,} bytes"
        f" {what} may have; refusing to read it."
      )
    chunks, left = [], info.st_size
    while left > 0:
      chunk = os.read(fd, min(left, 1 << 24))
      if not chunk:
        raise OSError(
          f"{path} shrank while it was read: {info.st_size - left} of"
          f" {info.st_size} bytes. Is another program rewriting it?",
        )
      chunks.append(chunk)
      left -= len(chunk)
    return b"".join(chunks)
  finally:
    os.close(fd)

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


def read_regular(
  path: str | os.PathLike[str], what: str, limit: int | None = None
) -> bytes:
  """The bytes of the regular file ``path``.

  Args:
    path: The file.
    what: What the file should be, for messages (e.g. ``"a vocab.txt"``).
    limit: If given, files larger than this many bytes are refused.

  Raises:
    FileNotFoundError: if nothing is at ``path``.
    OSError: if ``path`` is a directory, FIFO, device or socket (named,
      with what it is), is larger than ``limit``, or cannot be read.

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
  flags = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
  )
  try:
    fd = os.open(path, flags)
  except IsADirectoryError:
    raise IsADirectoryError(
      f"{path} is a directory, not a regular file: cannot read it as {what}."
    ) from None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise OSError(
        f"{path} is {kind_of(info.st_mode)}, not a regular file: cannot read"
        f" it as {what}."
      )
    if limit is not None and info.st_size > limit:
      raise OSError(
        f"{path} holds {info.st_size} bytes, more than the {limit} bytes"
        f" {what} may have."
      )
    chunks, left = [], info.st_size
    while left > 0:
      chunk = os.read(fd, min(left, 1 << 24))
      if not chunk:
        raise OSError(
          f"{path} shrank while it was read: {info.st_size - left} of"
          f" {info.st_size} bytes. Is another program rewriting it?"
        )
      chunks.append(chunk)
      left -= len(chunk)
    return b"".join(chunks)
  finally:
    os.close(fd)

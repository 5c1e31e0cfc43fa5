"""Atomic file replacement: write a temporary file, then rename it.

A reader (or a crash) sees either the old file or the complete new one,
never half a file: the data goes to a temporary file in the destination's
directory (same file system, so `os.replace` is an atomic rename), is
flushed to disk, and only then renamed over the destination. On any error
the temporary file is removed and the destination is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[str]:
  """Yields a temporary path to write; renames it over ``path`` on success.

  The temporary file exists (empty) when the block starts; the block may
  reopen it for writing by name. It gets the permissions a plain ``open``
  would give (or those of the file it replaces).

  Example:

  >>> import os, pathlib, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "out.txt")
  ...   with replacing(path) as partial:
  ...     with open(partial, "w") as f:
  ...       _ = f.write("done")
  ...   print(pathlib.Path(path).read_text(), os.listdir(tmp))
  done ['out.txt']
  """
  path = os.fspath(path)
  directory, base = os.path.split(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"Cannot write {path!r}: the directory {directory!r} does not exist."
    )
  temp = _create_temp(directory, base)
  try:
    mode = _mode_to_give(path, temp)
    yield temp
    with contextlib.suppress(OSError):  # writers may have recreated it 0o600
      os.chmod(temp, mode)
    _fsync(temp)
    os.replace(temp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temp)
    raise
  _fsync_directory(directory)


def is_temporary(name: str) -> bool:
  """True for the names `replacing` gives its temporary files.

  >>> is_temporary(".table.safetensors.1a2b3c4d.tmp")
  True
  """
  return name.startswith(".") and name.endswith(".tmp")


def _create_temp(directory: str, base: str) -> str:
  flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
  while True:
    temp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    try:
      os.close(os.open(temp, flags, 0o666))  # the umask applies, as in open
    except FileExistsError:
      continue
    return temp


def _mode_to_give(path: str, temp: str) -> int:
  """The replaced file's permissions, else those ``open`` gave ``temp``."""
  for existing in (path, temp):
    try:
      return os.stat(existing).st_mode & 0o7777
    except OSError:
      continue
  return 0o644


def _fsync(path: str) -> None:
  with open(path, "r+b") as f:  # writable: Windows syncs only those
    os.fsync(f.fileno())


def _fsync_directory(directory: str) -> None:
  """Makes the rename durable where directories can be synced (POSIX)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)

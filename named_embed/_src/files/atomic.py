"""Atomic file replacement: write in a temporary directory, then rename.

A reader (or a crash) sees either the old file or the complete new one,
never half a file. A save of ``dir/name`` works in a private temporary
directory beside it, ``dir/.name.<8 hex digits>.tmp/`` (same file system,
so `os.replace` is an atomic rename): the data goes to
``dir/.name.<hex>.tmp/name``, is flushed to disk, and only then renamed
over ``dir/name``. On any error the temporary directory is removed and the
destination is left untouched.

The directory, rather than a single temporary file, holds everything a
writer creates: safetensors (0.8 does) itself writes to a
``.tmpXXXXXX`` file beside the name it is given and renames that into
place, so a save killed inside it used to leave an anonymous ``.tmpXXXXXX``
file next to the destination; now that file is inside the temporary
directory and goes with it.

Crash leftovers. A process killed while saving (``kill -9``, power loss)
cannot clean up, so its temporary directory stays, up to the size of the
table. The writer holds an exclusive `fcntl.flock` on its temporary
directory for the whole save; the kernel releases it when the process
dies. Each later save of the same path first removes the temporaries of
that path whose lock it can take without waiting (their writers are gone)
and leaves alone those still locked (a save of the same path running in
another process or thread). Only names of this exact pattern are touched.
Between creating its directory and locking it (an instant, while the
directory is still empty) a writer is not protected: if a cleanup removes
the directory then, the writer notices and starts over in a new one.
Where `fcntl` is missing (Windows) or the file system refuses locks (some
network file systems), nothing is locked and stale temporaries are left
alone, to be deleted by hand.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator

try:
  import fcntl
except ImportError:  # Windows
  fcntl = None

_TOKEN = r"[0-9a-f]{8}"  # secrets.token_hex(4)
_ANY_TEMPORARY = re.compile(r"\.(?P<base>.+)\." + _TOKEN + r"\.tmp")
_LOST = -1  # `_lock`: the directory was removed before we locked it


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[str]:
  """Yields a temporary path to write; renames it over ``path`` on success.

  The temporary file exists (empty) when the block starts, inside a
  private directory ``.{name}.{8 hex digits}.tmp`` beside ``path``; the
  block may reopen it for writing by name, or replace it (by renaming a
  file of that directory onto it). It gets the permissions a plain
  ``open`` would give (or those of the file it replaces). The directory
  is removed when the block ends, whether it succeeds or fails.

  Before starting, the temporaries that earlier saves of ``path`` left
  when they were killed are removed (see `remove_stale_temporaries`); the
  directory is locked (`fcntl.flock`) for the whole save so that a save of
  the same path starting meanwhile, in any process or thread, leaves it
  alone.

  Example:

  >>> import os, pathlib, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   path = os.path.join(tmp, "out.txt")
  ...   with replacing(path) as partial:
  ...     with open(partial, "w") as f:
  ...       _ = f.write("done")
  ...     work = os.path.basename(os.path.dirname(partial))
  ...     print(work.startswith(".out.txt."), os.listdir(tmp) == [work])
  ...   print(pathlib.Path(path).read_text(), os.listdir(tmp))
  True True
  done ['out.txt']
  """
  path = os.fspath(path)
  directory, base = os.path.split(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"Cannot write {path!r}: the directory {directory!r} does not exist."
    )
  remove_stale_temporaries(path)
  work, lock = _create_work_directory(directory, base)
  try:
    temp = os.path.join(work, base)
    _create_empty(temp)
    mode = _mode_to_give(path, temp)
    yield temp
    with contextlib.suppress(OSError):  # writers may have recreated it 0o600
      os.chmod(temp, mode)
    _fsync(temp)
    os.replace(temp, path)
  finally:
    shutil.rmtree(work, ignore_errors=True)
    if lock is not None:
      os.close(lock)  # releases the lock, after the directory is gone
  _fsync_directory(directory)


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[str]:
  """Deletes the temporaries of earlier saves of ``path`` that were killed.

  Looks beside ``path`` for names ``.{name}.{8 hex digits}.tmp`` only (the
  ones `replacing` gives) and deletes each whose `fcntl.flock` can be
  taken without waiting: its writer has died, so the kernel released the
  lock. Temporaries still locked belong to saves running now, in this or
  another process, and are kept. Plain files of that pattern (versions of
  named_embed before these locks wrote a single temporary file) are
  deleted the same way. Symbolic links are never followed. Without `fcntl`
  (Windows) nothing is deleted. `replacing` calls this before each save.

  Returns:
    The paths deleted.

  Example:

  >>> import os, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   stale = os.path.join(tmp, ".t.safetensors.0123abcd.tmp")
  ...   os.mkdir(stale)  # as a killed save leaves it:
  ...   open(os.path.join(stale, "t.safetensors"), "w").close()
  ...   open(os.path.join(tmp, ".t.safetensors.notes.tmp"), "w").close()
  ...   removed = remove_stale_temporaries(os.path.join(tmp, "t.safetensors"))
  ...   print([os.path.basename(p) for p in removed], os.listdir(tmp))
  ['.t.safetensors.0123abcd.tmp'] ['.t.safetensors.notes.tmp']
  """
  directory, base = os.path.split(os.path.abspath(os.fspath(path)))
  return remove_abandoned(directory, re.compile(re.escape(base)))


def remove_abandoned(
  directory: str | os.PathLike[str], bases: re.Pattern[str]
) -> list[str]:
  """Deletes the abandoned temporaries in ``directory`` of saves of every
  name that ``bases`` matches whole (see `remove_stale_temporaries`).

  For writers that give each save new names (a checkpoint directory's
  files): a killed save's temporary is not that of the next save's name.

  Returns:
    The paths deleted.

  >>> import os, re, tempfile
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   for name in ("a-1.bin", "a-2.bin", "b.bin"):
  ...     os.mkdir(os.path.join(tmp, f".{name}.0123abcd.tmp"))
  ...   removed = remove_abandoned(tmp, re.compile(r"a-[0-9]+[.]bin"))
  ...   print(sorted(os.path.basename(p) for p in removed), os.listdir(tmp))
  ['.a-1.bin.0123abcd.tmp', '.a-2.bin.0123abcd.tmp'] ['.b.bin.0123abcd.tmp']
  """
  if fcntl is None:
    return []
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  removed = []
  for name in sorted(names):
    match = _ANY_TEMPORARY.fullmatch(name)
    if match and bases.fullmatch(match["base"]):
      candidate = os.path.join(directory, name)
      if _remove_if_abandoned(candidate):
        removed.append(candidate)
  return removed


def is_temporary(name: str) -> bool:
  """True for the names `replacing` gives its temporary directories.

  >>> is_temporary(".table.safetensors.1a2b3c4d.tmp")
  True
  >>> is_temporary(".tmpAbC123"), is_temporary(".table.safetensors.x.tmp")
  (False, False)
  """
  return _ANY_TEMPORARY.fullmatch(name) is not None


def _create_work_directory(directory: str, base: str) -> tuple[str, int | None]:
  """Creates and locks ``.{base}.{hex}.tmp``; returns it and the lock fd."""
  for _ in range(100):  # each concurrent save's cleanup may take one
    token = secrets.token_hex(4)
    work = os.path.join(directory, f".{base}.{token}.tmp")
    try:
      os.mkdir(work, 0o700)
    except FileExistsError:
      continue
    lock = _lock(work)
    if lock != _LOST:
      return work, lock
  raise OSError(
    f"Cannot write {base!r} in {directory!r}: its temporary directories"
    " keep disappearing before they can be locked."
  )


def _lock(work: str) -> int | None:
  """Locks a fresh temporary directory for good: the fd, None or `_LOST`.

  A cleanup by a save of the same path may have found the directory before
  this lock, locked it and deleted it. So after locking (which waits for
  such a cleanup to finish) the directory must still be the one locked; if
  not, `_LOST` asks for a new one. None: locks are unavailable here, the
  save runs unlocked (and no cleanup deletes what it cannot lock).
  """
  if fcntl is None:
    return None
  try:
    fd = os.open(work, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except FileNotFoundError:
    return _LOST
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
  except OSError:  # e.g. a network file system without flock
    os.close(fd)
    return None
  try:
    still_there = _same_file(os.fstat(fd), os.lstat(work))
  except OSError:
    still_there = False
  if not still_there:
    os.close(fd)
    return _LOST
  return fd


def _remove_if_abandoned(candidate: str) -> bool:
  """Deletes ``candidate`` if nobody holds its lock; True if it did."""
  flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
  flags |= getattr(os, "O_NONBLOCK", 0)  # were it a FIFO, opening waits
  try:
    fd = os.open(candidate, flags)  # a symbolic link fails: never followed
  except OSError:
    return False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a running save (or no locks here): keep it
      return False
    try:
      info = os.lstat(candidate)
    except OSError:
      return False
    if not _same_file(os.fstat(fd), info):
      return False
    if stat.S_ISDIR(info.st_mode):
      shutil.rmtree(candidate, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.unlink(candidate)
    return not os.path.lexists(candidate)
  finally:
    os.close(fd)  # after the deletion: a new writer's `_lock` waits for it


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _create_empty(temp: str) -> None:
  flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
  os.close(os.open(temp, flags, 0o666))  # the umask applies, as in open


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

"""What the processes of a `jax.distributed` run agree on, and when.

Under JAX's multi-process runtime every process runs the same program, and
a collective waits for every process. A process that raises on its own (a
file missing on its host, a full disk) leaves the others waiting in the
next collective until XLA gives up, minutes later. So each step of a load
or a save that can fail on one process ends with `share` (or `together`):

1. each process posts its outcome, a short string or its error, to JAX's
   coordination service (the key-value store that `jax.distributed` runs);
2. it waits at a barrier of the coordination service, with a timeout;
3. it reads every process's outcome: if any process failed, every process
   raises, naming the process and its error; else each gets the values.

No XLA collective is involved, so nothing is compiled and nothing waits
without a deadline. A process that never arrives (it died, or took
another path through the program) makes the others raise `TimeoutError`
after `timeout_seconds()` seconds: the environment variable
``NAMED_EMBED_SYNC_TIMEOUT``, 300 by default.

On one process every function here returns at once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator

import jax

TIMEOUT_VARIABLE = "NAMED_EMBED_SYNC_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 300.0

# Errors another process raised are raised here with their own type when it
# is one of these (their arguments are a message); else as RuntimeError.
_RERAISED = {
  cls.__name__: cls
  for cls in (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    TimeoutError,
    OSError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    NotImplementedError,
    RuntimeError,
  )
}
_steps = itertools.count()  # every process counts the same steps


def count() -> int:
  """The number of processes (`jax.process_count`).

  >>> count()
  1
  """
  return jax.process_count()


def index() -> int:
  """This process's index (`jax.process_index`).

  >>> index()
  0
  """
  return jax.process_index()


def timeout_seconds() -> float:
  """How long a process waits for the others at each step.

  Raises:
    ValueError: if ``NAMED_EMBED_SYNC_TIMEOUT`` is not a positive number.

  >>> timeout_seconds()
  300.0
  """
  text = os.environ.get(TIMEOUT_VARIABLE)
  if text is None:
    return DEFAULT_TIMEOUT_SECONDS
  try:
    seconds = float(text)
  except ValueError:
    seconds = float("nan")
  if not seconds > 0:
    raise ValueError(
      f"{TIMEOUT_VARIABLE} must be a positive number of seconds, got {text!r}."
    )
  return seconds


def share(
  what: str, value: str = "", error: Exception | None = None
) -> list[str]:
  """Every process's ``value``, in process order, once all have posted.

  Args:
    what: The step, for messages (``"ne.save('out'): writing rows"``).
    value: This process's value.
    error: This process's failure, if it failed (``value`` is then unused).

  Returns:
    The values of processes ``0 .. count() - 1``.

  Raises:
    Exception: ``error`` itself on the process that failed; on the others,
      an error of the same type (one of the builtin ones, else
      `RuntimeError`) that names the failed process and its message.
    TimeoutError: if some process did not reach this step in time.

  >>> share("a step", "x")
  ['x']
  >>> share("a step", error=ValueError("bad"))
  Traceback (most recent call last):
  ...
  ValueError: bad
  """
  if count() == 1:
    if error is not None:
      raise error
    return [value]
  payload = {"value": value}
  if error is not None:
    payload = {"type": type(error).__name__, "message": str(error)}
  outcomes = _exchange(what, json.dumps(payload))
  if error is not None:
    raise error
  failed = [(p, o) for p, o in enumerate(outcomes) if "value" not in o]
  if failed:
    raise _remote_error(what, failed)
  return [outcome["value"] for outcome in outcomes]


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
  """Runs a block on every process; if it fails on any, it fails on all.

  The block must not itself wait for other processes (no collectives):
  the agreement comes after it. See `share`.

  >>> with together("a step"):
  ...   pass
  """
  try:
    yield
  except Exception as error:
    share(what, error=error)
    raise  # unreachable: share raises ``error``
  share(what)


def _remote_error(what: str, failed: list[tuple[int, dict]]) -> Exception:
  first, outcome = failed[0]
  others = [p for p, _ in failed[1:]]
  also = f" (and on processes {others})" if others else ""
  kind = _RERAISED.get(outcome.get("type"), RuntimeError)
  return kind(
    f"{what} failed on process {first} of {count()}{also}:"
    f" {outcome.get('type')}: {outcome.get('message')}"
  )


def _exchange(what: str, payload: str) -> list[dict]:
  client = _client()
  step = next(_steps)
  directory = f"named_embed/step{step}/"
  client.key_value_set(directory + str(index()), payload)
  seconds = timeout_seconds()
  try:
    client.wait_at_barrier(f"named_embed/step{step}", int(seconds * 1000))
  except Exception as error:  # jax.errors.JaxRuntimeError: DEADLINE_EXCEEDED
    reason = str(error).strip().splitlines()[0] if str(error) else ""
    raise TimeoutError(
      f"{what}: process {index()} waited {seconds:g} s for the other"
      f" {count() - 1} processes, and some never arrived ({reason}). A"
      " process may have died, or skipped this call: every process must"
      " make the same named_embed calls in the same order. Set"
      f" {TIMEOUT_VARIABLE} to wait longer."
    ) from None
  posted = dict(client.key_value_dir_get(directory))
  outcomes = []
  for process in range(count()):
    text = posted.get(directory + str(process))
    outcomes.append(json.loads(text) if text else {"type": "missing"})
  return outcomes


def _client():
  # JAX's coordination-service client has no public accessor; orbax reads
  # it the same way. It exists whenever jax.distributed is initialized.
  from jax._src import distributed

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(
      f"{count()} processes but no jax.distributed client: call"
      " jax.distributed.initialize(...) before any other JAX call."
    )
  return client

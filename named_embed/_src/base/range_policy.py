"""The out-of-range policy: its names, validation, and what it does to ids.

Every call that reads rows by id (lookups, the fused loss's targets, and
later pooled lookups) takes ``out_of_range=`` and goes through this module:

- `check_policy` validates the name (one of `POLICIES`);
- `admit_ids` applies the policy on the host to host ids wider than 32
  bits (with x64 off JAX would wrap them to int32 on the way in), then
  calls `needs_runtime_check`;
- `needs_runtime_check` decides, for ``"error"``, whether the ids are
  checked now (concrete ids: an `IndexError` at once) or inside the
  computation (traced ids);
- `safe_ids` maps ids into ``[0, V)`` by the policy and says which were
  valid, so kernels gather with ``mode="promise_in_bounds"``.

The ``"error"`` check inside a computation is one primitive,
``named_embed_check_ids``, which returns its integer input unchanged and
fails when an id lies outside ``[0, vocab_size)``:

- called on concrete arrays (eagerly) it raises `IndexError` at once;
- lowered inside `jax.jit` it compiles for any ids; at run time a device-side
  ``any(bad)`` guards a host callback that raises the same `IndexError`
  (surfacing as a JAX runtime error), so valid ids never leave the device;
- under `jax.experimental.checkify.checkify` it becomes a functionalised
  check (a ``FailedCheckError`` naming the first offending id and position).

The checkify rule uses ``jax._src.checkify``'s rule table, the only way to
give a primitive a checkify rule; it is registered when that module exists.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from named_embed._src.base import validation

POLICIES = ("fill", "clip", "wrap", "error")
"""The out-of-range policies, as ``out_of_range=`` takes them."""


def check_policy(out_of_range: object) -> str:
  """Returns ``out_of_range`` if it names a policy; raises otherwise.

  >>> check_policy("clip")
  'clip'
  """
  return validation.check_choice("out_of_range", out_of_range, POLICIES)


_HOST_IDS = (np.ndarray, np.integer)
_WIDE_DTYPES = (np.dtype(np.int64), np.dtype(np.uint64))
_INT32 = np.iinfo(np.int32)


def admit_ids(
  ids: object,
  policy: str,
  vocab_size: int,
  mask: object = None,
  runtime: bool = False,
) -> tuple[object, bool]:
  """Ids ready for a kernel, and whether ``"error"`` checks them at run time.

  Host (numpy) int64 and uint64 ids are resolved here, exactly, while x64 is
  off: passing them to a jitted kernel would convert them to int32 (uint32)
  by keeping their low 32 bits, so ``2**32 + 1`` would read row 1. Where all
  are in ``[0, vocab_size)`` they pass as they are; otherwise ``"clip"`` and
  ``"wrap"`` become the int32 ids they select (``id % vocab_size`` computed
  on the 64-bit values), ``"error"`` raises `IndexError` naming the
  original ids, and ``"fill"`` saturates them to the int32 range (still out
  of range, so still NaN rows). Device arrays and narrower ids are returned
  untouched, with no work beyond one ``isinstance``.

  Args:
    ids: Raw ids (as `named_embed._src.base.named_arrays.split_tokens` returns them).
    policy: One of `POLICIES`.
    vocab_size: The number of valid ids.
    mask: Positions where it is False are exempt from ``"error"``.
    runtime: ``"error"`` checks at run time whatever the ids (the caller
      knows only then which ids count, as with a traced ``mask``); host
      ids are then saturated to int32, out of range as they were.

  Returns:
    ``(ids, runtime_check)``, ``runtime_check`` as `needs_runtime_check`.

  Raises:
    IndexError: under ``"error"``, for concrete out-of-range ids.

  >>> admit_ids(np.array([2**32 + 1, -2**40, 4]), "clip", 5)[0]
  array([4, 0, 4], dtype=int32)
  >>> admit_ids(np.array([2**32 + 1, 3]), "wrap", 5)[0]  # 2**32 + 1 = 2 mod 5
  array([2, 3], dtype=int32)
  """
  if (
    isinstance(ids, _HOST_IDS)
    and ids.dtype in _WIDE_DTYPES
    and not jax.config.read("jax_enable_x64")
  ):
    runtime = runtime or isinstance(mask, jax.core.Tracer)
    ids = _narrow(ids, policy, vocab_size, None if runtime else mask, runtime)
  if policy != "error":
    return ids, False
  return ids, runtime or needs_runtime_check(policy, ids, vocab_size, mask)


def _narrow(
  ids: np.ndarray, policy: str, vocab_size: int, mask: object, runtime: bool
) -> np.ndarray:
  """`admit_ids` for host int64 / uint64 ids (see there)."""
  if ids.size == 0 or (ids.min() >= 0 and ids.max() < vocab_size):
    return ids  # the common case: converting them to int32 is exact
  if policy == "clip":
    return np.clip(ids, 0, vocab_size - 1).astype(np.int32)
  if policy == "wrap":
    return np.remainder(ids, vocab_size).astype(np.int32)
  if policy == "error" and not runtime:
    checked = ids if mask is None else np.where(np.asarray(mask), ids, 0)
    raise_if_out_of_range(checked, vocab_size)
  # "fill", and ids "error" exempts or checks later: out of range they stay.
  if ids.dtype.kind == "u":
    return np.minimum(ids, _INT32.max).astype(np.int32)
  return np.clip(ids, _INT32.min, _INT32.max).astype(np.int32)


def safe_ids(
  ids: jax.Array,
  vocab_size: int,
  policy: str,
  runtime_check: bool = False,
  sharded: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """Maps ``ids`` into ``[0, V)`` by ``policy``; returns ``(safe, valid)``.

  ``valid`` is None unless the policy is ``"fill"``, where it marks the ids
  that were already in range. ``runtime_check`` (from `needs_runtime_check`)
  runs the ``"error"`` check inside the computation. ``sharded`` says the
  computation spans several devices: ``"error"`` then reports bad ids on
  the ``named_embed`` logger and fills their rows with NaN instead of
  raising (see `check_ids`).
  """
  if jnp.dtype(ids.dtype).itemsize < 4:
    # uint8/int16 ids cannot hold V (or V - 1) for larger vocabularies.
    ids = ids.astype(jnp.int32)
  if policy == "fill":
    valid = (ids >= 0) & (ids < vocab_size)
    return jnp.where(valid, ids, jnp.zeros_like(ids)), valid
  if policy == "wrap":
    return jnp.remainder(ids, vocab_size), None
  if policy == "error" and runtime_check:
    ids = check_ids(ids, vocab_size, fatal=not sharded)
    if sharded:
      valid = (ids >= 0) & (ids < vocab_size)
      return jnp.where(valid, ids, jnp.zeros_like(ids)), valid
  # "clip", and "error" (clamping keeps a checkified call in bounds).
  return jnp.clip(ids, 0, vocab_size - 1), None


MAX_REPORTED = 8
"""How many offending ids an error message lists."""


def out_of_range_message(ids: np.ndarray, vocab_size: int) -> str | None:
  """Describes the ids of ``ids`` outside ``[0, vocab_size)``, or None."""
  ids = np.asarray(ids)
  wide = ids.astype(np.int64) if ids.dtype.itemsize < 8 else ids
  bad = (wide < 0) | (wide >= vocab_size)
  count = int(bad.sum())
  if not count:
    return None
  positions = np.argwhere(bad)[:MAX_REPORTED]
  listed = ", ".join(
    f"id {int(ids[tuple(p)])} at position {tuple(int(i) for i in p)}"
    for p in positions
  )
  more = f" and {count - len(positions)} more" if count > len(positions) else ""
  return (
    f"{count} token id(s) outside the vocabulary [0, {vocab_size})"
    f' under out_of_range="error": {listed}{more}. Use out_of_range="fill",'
    ' "clip" or "wrap" to accept such ids.'
  )


def raise_if_out_of_range(ids: np.ndarray, vocab_size: int) -> None:
  """Raises `IndexError` naming the offending ids and their positions."""
  message = out_of_range_message(ids, vocab_size)
  if message is not None:
    raise IndexError(message)


def needs_runtime_check(
  policy: str, ids: object, vocab_size: int, mask: object = None
) -> bool:
  """Whether ``policy`` needs the id check inside the computation.

  Only ``"error"`` checks ids: concrete ids are checked now (raising
  `IndexError`) and need nothing more; traced ids return True. Positions
  where ``mask`` is False are exempt.
  """
  if policy != "error":
    return False
  if isinstance(ids, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
    return True
  if not all(getattr(x, "is_fully_addressable", True) for x in (ids, mask)):
    return True  # ids on other processes: no host holds them all
  ids = np.asarray(ids)
  if mask is not None:
    ids = np.where(np.asarray(mask), ids, 0)
  raise_if_out_of_range(ids, vocab_size)
  return False


def _host_check(ids: np.ndarray, *, vocab_size: int) -> np.ndarray:
  raise_if_out_of_range(ids, vocab_size)
  return ids


check_ids_p = Primitive("named_embed_check_ids")


def _host_report(ids: np.ndarray, *, vocab_size: int) -> np.ndarray:
  message = out_of_range_message(ids, vocab_size)
  if message is not None:
    logging.getLogger("named_embed").error(message)
  return ids


def check_ids(ids: jax.Array, vocab_size: int, fatal: bool = True):
  """Returns ``ids``; fails (see the module docstring) on out-of-range ids.

  With ``fatal=False`` (computations spread over several devices, where an
  exception raised by one device's callback would leave the others waiting
  in a collective until XLA aborts the process) the offending ids are
  logged as an error on the ``named_embed`` logger instead, and the caller
  fills their rows with NaN.
  """
  return check_ids_p.bind(ids, vocab_size=vocab_size, fatal=fatal)


def _impl(ids, *, vocab_size, fatal):
  if fatal:
    raise_if_out_of_range(np.asarray(ids), vocab_size)
  else:
    _host_report(np.asarray(ids), vocab_size=vocab_size)
  return ids


def _runtime_check(ids, *, vocab_size, fatal):
  wide = ids.astype(jnp.int32) if ids.dtype.itemsize < 4 else ids
  host = _host_check if fatal else _host_report

  def fail(ids):
    shape = jax.ShapeDtypeStruct(ids.shape, ids.dtype)
    return io_callback(lambda x: host(x, vocab_size=vocab_size), shape, ids)

  bad = (wide < 0) | (wide >= vocab_size)
  return lax.cond(jnp.any(bad), fail, lambda ids: ids, ids)


check_ids_p.def_impl(_impl)
check_ids_p.def_abstract_eval(lambda ids, **params: ids)
mlir.register_lowering(
  check_ids_p, mlir.lower_fun(_runtime_check, multiple_results=False)
)
ad.primitive_jvps[check_ids_p] = lambda primals, tangents, **params: (
  check_ids_p.bind(*primals, **params),
  tangents[0],
)
batching.primitive_batchers[check_ids_p] = lambda args, dims, **params: (
  check_ids_p.bind(*args, **params),
  dims[0],
)


def _register_checkify_rule() -> None:
  try:
    from jax._src import checkify as checkify_internals
  except ImportError:  # pragma: no cover - depends on the jax version
    return

  def rule(error, enabled_errors, ids, *, vocab_size, fatal):
    del fatal
    wanted = {checkify_internals.FailedCheckError, checkify_internals.OOBError}
    if not wanted & set(enabled_errors):
      return error, ids
    wide = ids.astype(jnp.int32) if ids.dtype.itemsize < 4 else ids
    bad = (wide < 0) | (wide >= vocab_size)
    first = jnp.argmax(bad.reshape(-1))
    position = (
      jnp.stack(jnp.unravel_index(first, ids.shape))
      if ids.ndim
      else (jnp.zeros((0,), jnp.int32))
    )
    new_error = checkify_internals.FailedCheckError(
      checkify_internals.get_traceback(),
      "{count} token id(s) outside the vocabulary [0, "
      + str(vocab_size)
      + ') under out_of_range="error"; the first is id {id} at position'
      " {position}",
      count=jnp.sum(bad),
      id=ids.reshape(-1)[first],
      position=position,
    )
    return checkify_internals.assert_func(error, jnp.any(bad), new_error), ids

  checkify_internals.error_checks[check_ids_p] = rule


_register_checkify_rule()

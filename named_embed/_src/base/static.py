"""`Static`: equality and a cached hash for static configuration objects.

Row sources and kernel configurations are frozen dataclasses used as jit
and plan cache keys: hashed on every eager call. A dataclass's generated
hash hashes every field each time; `Static` hashes them once.
"""

from __future__ import annotations

import dataclasses


class Static:
  """Mixin of frozen dataclasses declared with ``eq=False``: equal when of
  one type with equal fields, hashed once.

  Example:

  >>> import dataclasses
  >>> from named_embed._src.base.static import Static
  >>> @dataclasses.dataclass(frozen=True, eq=False)
  ... class Config(Static):
  ...   size: int
  >>> Config(3) == Config(3), len({Config(3), Config(3), Config(4)})
  (True, 2)
  """

  def _fields(self) -> tuple:
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

  def __eq__(self, other):
    return self is other or (
      type(self) is type(other) and self._fields() == other._fields()
    )

  def __hash__(self):
    cached = self.__dict__.get("_hash")
    if cached is None:
      cached = hash((type(self), self._fields()))
      object.__setattr__(self, "_hash", cached)
    return cached

"""Sharding by axis name: map NamedArray axis names to mesh axes.

One mapping, supplied from outside, says where each named axis lives::

  rules = {"vocabulary": "model", "batch": "data"}   # name -> mesh axis
  sharded = ne.shard(tree, mesh, rules)

Layers stay sharding-agnostic: they emit plain JAX, and JAX's own machinery
(`NamedSharding`, GSPMD, `jax.shard_map`) partitions it. A lookup on a
vocabulary-sharded table becomes a masked local gather plus one all-reduce
of the ``[tokens, embedding]`` rows; a decode computes local logits; the
fused loss combines per-shard statistics with one small all-reduce and
chunks within each shard (`named_embed._src.rows.vocab_parallel`).

The code lives in `named_embed._src.tools.sharding`; this module re-exports
its public names.
"""

from __future__ import annotations

from named_embed._src.tools.sharding import Rules as Rules
from named_embed._src.tools.sharding import axis_names as axis_names
from named_embed._src.tools.sharding import check_rule_names as check_rule_names
from named_embed._src.tools.sharding import partition_spec as partition_spec
from named_embed._src.tools.sharding import shard as shard
from named_embed._src.tools.sharding import sharded_init as sharded_init

__all__ = [
  "Rules",
  "axis_names",
  "check_rule_names",
  "partition_spec",
  "shard",
  "sharded_init",
]

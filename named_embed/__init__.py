"""named_embed: named-axis embedding tables, lookups and decodes for JAX.

The public surface, re-exported from the modules that define it::

  import named_embed as ne
  table = ne.EmbeddingTable.from_config(...)   # or .from_pretrained(...)
  ne.EmbeddingLookup(table)(tokens); ne.EmbeddingDecode(table)(hidden)
  ne.lookup(table, tokens); ne.decode(table, hidden)
  ne.decode_cross_entropy(table, hidden, targets)   # never builds the logits
"""

from named_embed import sharding as sharding
from named_embed._src.base.vocabulary import Vocabulary as Vocabulary
from named_embed._src.ops.decode import EmbeddingDecode as EmbeddingDecode
from named_embed._src.ops.decode import decode as decode
from named_embed._src.ops.lookup import EmbeddingLookup as EmbeddingLookup
from named_embed._src.ops.lookup import lookup as lookup
from named_embed._src.ops.loss import (
  decode_cross_entropy as decode_cross_entropy,
)
from named_embed._src.ops.pooled.lookup import EmbeddingBag as EmbeddingBag
from named_embed._src.ops.pooled.lookup import pooled_lookup as pooled_lookup
from named_embed._src.tables.lora import LoraTable as LoraTable
from named_embed._src.tables.quantized import QuantizedTable as QuantizedTable
from named_embed._src.tables.table import EmbeddingTable as EmbeddingTable
from named_embed._src.tables.trainable_rows import (
  TrainableRowsTable as TrainableRowsTable,
)
from named_embed._src.tools.inspection import analogy as analogy
from named_embed._src.tools.inspection import nearest as nearest
from named_embed._src.tools.inspection import similarity as similarity
from named_embed._src.tools.model_tables import replace_table as replace_table
from named_embed._src.tools.neighbors import Neighbors as Neighbors
from named_embed._src.tools.rendering import (
  row_norm_statistics as row_norm_statistics,
)
from named_embed._src.tools.rendering import show as show
from named_embed._src.tools.rendering import summarize as summarize
from named_embed._src.tools.sharding import shard as shard
from named_embed._src.tools.sharding import sharded_init as sharded_init
from named_embed._src.tools.similar import most_similar as most_similar
from named_embed.formats import from_brainstate as from_brainstate
from named_embed.formats import from_flax as from_flax
from named_embed.formats import from_safetensors as from_safetensors
from named_embed.formats import from_torch as from_torch
from named_embed.formats import from_torch_weight as from_torch_weight
from named_embed.formats import load as load
from named_embed.formats import load_word2vec as load_word2vec
from named_embed.formats import save as save
from named_embed.formats import save_word2vec as save_word2vec
from named_embed.formats import to_brainstate_weight as to_brainstate_weight
from named_embed.formats import to_flax as to_flax
from named_embed.formats import to_safetensors as to_safetensors
from named_embed.formats import to_torch_weight as to_torch_weight

__version__ = "0.1.0"

__all__ = [
  "EmbeddingBag",
  "EmbeddingDecode",
  "EmbeddingLookup",
  "EmbeddingTable",
  "LoraTable",
  "Neighbors",
  "QuantizedTable",
  "TrainableRowsTable",
  "Vocabulary",
  "analogy",
  "decode",
  "decode_cross_entropy",
  "from_brainstate",
  "from_flax",
  "from_safetensors",
  "from_torch",
  "from_torch_weight",
  "load",
  "load_word2vec",
  "lookup",
  "most_similar",
  "nearest",
  "pooled_lookup",
  "replace_table",
  "row_norm_statistics",
  "save",
  "save_word2vec",
  "shard",
  "sharded_init",
  "sharding",
  "show",
  "similarity",
  "summarize",
  "to_brainstate_weight",
  "to_flax",
  "to_safetensors",
  "to_torch_weight",
]

"""named_embed: named-axis embedding tables, lookups and decodes for JAX.

The public surface, re-exported from the modules that define it::

  import named_embed as ne
  table = ne.EmbeddingTable.from_config(...)   # or .from_pretrained(...)
  ne.EmbeddingLookup(table)(tokens); ne.EmbeddingDecode(table)(hidden)
  ne.lookup(table, tokens); ne.decode(table, hidden)
  ne.decode_cross_entropy(table, hidden, targets)   # never builds the logits
"""

from named_embed.decode import EmbeddingDecode as EmbeddingDecode
from named_embed.decode import decode as decode
from named_embed.lookup import EmbeddingLookup as EmbeddingLookup
from named_embed.lookup import lookup as lookup
from named_embed.loss import decode_cross_entropy as decode_cross_entropy
from named_embed.table import EmbeddingTable as EmbeddingTable
from named_embed.vocabulary import Vocabulary as Vocabulary

__version__ = "0.1.0"

__all__ = [
  "EmbeddingDecode",
  "EmbeddingLookup",
  "EmbeddingTable",
  "Vocabulary",
  "decode",
  "decode_cross_entropy",
  "lookup",
]

"""Import and export of embedding tables; no pickle anywhere.

- `save` / `load`: a whole table (values bit for bit, axis names, pad
  token row, vocabulary) in one safetensors file (a path with a suffix) or
  a Hugging Face-style sharded directory where every process writes its
  own rows (a path without one), written atomically;
- `from_safetensors`: one tensor of a model checkpoint, e.g. BERT's
  ``embeddings.word_embeddings.weight``, with its ``vocab.txt`` (a single
  file, or a sharded checkpoint's directory or index);
- `to_safetensors`: a table's rows as a plain tensor any reader loads;
- `load_word2vec` / `save_word2vec`: word2vec text and binary, GloVe;
- `from_flax` / `to_flax`, `from_torch` / `from_torch_weight` /
  `to_torch_weight`, `from_brainstate` / `to_brainstate_weight`: other
  libraries' embedding layers, recognised without importing them;
- `from_penzai` / `to_penzai`: penzai's own ``pz.nn.EmbeddingTable``.

See ``docs/formats.md`` for what each format keeps and refuses.
"""

from named_embed._src.files.checkpoints import to_safetensors as to_safetensors
from named_embed._src.files.converters import from_brainstate as from_brainstate
from named_embed._src.files.converters import from_flax as from_flax
from named_embed._src.files.converters import from_penzai as from_penzai
from named_embed._src.files.converters import from_torch as from_torch
from named_embed._src.files.converters import (
  from_torch_weight as from_torch_weight,
)
from named_embed._src.files.converters import (
  to_brainstate_weight as to_brainstate_weight,
)
from named_embed._src.files.converters import to_flax as to_flax
from named_embed._src.files.converters import to_penzai as to_penzai
from named_embed._src.files.converters import to_torch_weight as to_torch_weight
from named_embed._src.files.safetensors_io import (
  from_safetensors as from_safetensors,
)
from named_embed._src.files.safetensors_io import load as load
from named_embed._src.files.safetensors_io import save as save
from named_embed._src.files.word2vec import load_word2vec as load_word2vec
from named_embed._src.files.word2vec import save_word2vec as save_word2vec

__all__ = [
  "from_brainstate",
  "from_flax",
  "from_penzai",
  "from_safetensors",
  "from_torch",
  "from_torch_weight",
  "load",
  "load_word2vec",
  "save",
  "save_word2vec",
  "to_brainstate_weight",
  "to_flax",
  "to_penzai",
  "to_safetensors",
  "to_torch_weight",
]

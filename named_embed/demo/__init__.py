"""The ``python -m named_embed`` demo: a tiny tied-embedding language model.

A character-level n-gram model in the style of Bengio et al. (2003), written
with penzai layers and named axes::

  tokens {"batch", "context"}
    -> EmbeddingLookup(table)           {"batch", "context", "embedding"}
    -> Affine(context x embedding -> hidden), gelu
    -> Linear(hidden -> embedding)      {"batch", "embedding"}
    -> EmbeddingDecode(table)           {"batch", "vocabulary"}

The lookup and the decode share one `EmbeddingTable`, so the model holds a
single embedding parameter (tied weights); the table carries a
`named_embed.Vocabulary` of the characters. The demo trains on a few fables
shipped in ``named_embed/data``: the loss is `named_embed.decode_cross_entropy`
on the hidden state before the decode (the logits are never built), the
optimiser is ``optax.adam`` with a cosine schedule, applied to the values of
`pz.unbind_params`. It prints the loss as it falls (with a `tqdm.auto` bar on
a terminal or in a notebook, and plain lines only in a log file), a sample
of generated text and each character's nearest rows (`named_embed.nearest`),
and writes an HTML page of the trained table with `named_embed.show`.

The modules, one concept each:

* `named_embed.demo.settings`: defaults and fixed settings.
* `named_embed.demo.text`: the fables, their `named_embed.Vocabulary` of
  characters, and their windows.
* `named_embed.demo.model`: the model, its tied table and its fused loss.
* `named_embed.demo.training`: the optax optimiser, training with a progress
  bar, evaluation and sampling.
* `named_embed.demo.cli`: `run` (the whole demo, including the page) and
  `main` (the command line).

Example (from a shell)::

  python -m named_embed --steps 300 --output named_embed_demo.html
"""

from __future__ import annotations

from named_embed.demo.cli import build_parser as build_parser
from named_embed.demo.cli import main as main
from named_embed.demo.cli import nearest_chars as nearest_chars
from named_embed.demo.cli import run as run
from named_embed.demo.model import ModelConfig as ModelConfig
from named_embed.demo.model import build_model as build_model
from named_embed.demo.model import embedding_table as embedding_table
from named_embed.demo.model import init_model as init_model
from named_embed.demo.model import model_loss as model_loss
from named_embed.demo.settings import DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE
from named_embed.demo.settings import (
  DEFAULT_LEARNING_RATE as DEFAULT_LEARNING_RATE,
)
from named_embed.demo.settings import DEFAULT_OUTPUT as DEFAULT_OUTPUT
from named_embed.demo.settings import DEFAULT_PROMPT as DEFAULT_PROMPT
from named_embed.demo.settings import DEFAULT_SEED as DEFAULT_SEED
from named_embed.demo.settings import DEFAULT_STEPS as DEFAULT_STEPS
from named_embed.demo.settings import EVAL_WINDOWS as EVAL_WINDOWS
from named_embed.demo.settings import SAMPLE_LENGTH as SAMPLE_LENGTH
from named_embed.demo.settings import SAMPLE_TEMPERATURE as SAMPLE_TEMPERATURE
from named_embed.demo.text import char_vocabulary as char_vocabulary
from named_embed.demo.text import decode as decode
from named_embed.demo.text import encode as encode
from named_embed.demo.text import load_text as load_text
from named_embed.demo.text import windows_at as windows_at
from named_embed.demo.training import TrainingLog as TrainingLog
from named_embed.demo.training import generate as generate
from named_embed.demo.training import make_evaluator as make_evaluator
from named_embed.demo.training import make_optimizer as make_optimizer
from named_embed.demo.training import make_train_step as make_train_step
from named_embed.demo.training import progress_bar as progress_bar
from named_embed.demo.training import train as train

__all__ = [
  "DEFAULT_BATCH_SIZE",
  "DEFAULT_LEARNING_RATE",
  "DEFAULT_OUTPUT",
  "DEFAULT_PROMPT",
  "DEFAULT_SEED",
  "DEFAULT_STEPS",
  "EVAL_WINDOWS",
  "SAMPLE_LENGTH",
  "SAMPLE_TEMPERATURE",
  "ModelConfig",
  "TrainingLog",
  "build_model",
  "build_parser",
  "char_vocabulary",
  "decode",
  "embedding_table",
  "encode",
  "generate",
  "init_model",
  "load_text",
  "main",
  "make_evaluator",
  "make_optimizer",
  "make_train_step",
  "model_loss",
  "nearest_chars",
  "progress_bar",
  "run",
  "train",
  "windows_at",
]

"""The ``python -m named_embed`` demo: a tiny tied-embedding language model.

A character-level n-gram model in the style of Bengio et al. (2003), written
with penzai layers and named axes::

  tokens {"batch", "context"}
    -> EmbeddingLookup(table)           {"batch", "context", "embedding"}
    -> Affine(context x embedding -> hidden), gelu
    -> Linear(hidden -> embedding)      {"batch", "embedding"}
    -> EmbeddingDecode(table)           {"batch", "vocabulary"}

The lookup and the decode share one `EmbeddingTable`, so the model holds a
single embedding parameter (tied weights). It trains on a few fables shipped
in ``named_embed/data`` with a hand-written Adam, prints the loss as it
falls and a sample of generated text, and writes an HTML page showing the
trained table with treescope. Runtime dependencies are those of the
package: jax, penzai, treescope and numpy.

The modules, one concept each:

* `named_embed.demo.settings`: defaults and fixed settings.
* `named_embed.demo.text`: the fables, their characters and windows.
* `named_embed.demo.model`: the model, its tied table and its loss.
* `named_embed.demo.adam`: Adam and the cosine learning-rate schedule.
* `named_embed.demo.progress`: the progress bar and the training log.
* `named_embed.demo.training`: training, evaluation and sampling.
* `named_embed.demo.page`: the HTML page of the trained table.
* `named_embed.demo.cli`: `run` (the whole demo) and `main` (the command
  line).

Example (from a shell)::

  python -m named_embed --steps 300 --output named_embed_demo.html
"""

from __future__ import annotations

from named_embed.demo.adam import AdamState as AdamState
from named_embed.demo.adam import adam_init as adam_init
from named_embed.demo.adam import adam_update as adam_update
from named_embed.demo.adam import cosine_decay as cosine_decay
from named_embed.demo.cli import build_parser as build_parser
from named_embed.demo.cli import main as main
from named_embed.demo.cli import run as run
from named_embed.demo.model import ModelConfig as ModelConfig
from named_embed.demo.model import build_model as build_model
from named_embed.demo.model import cross_entropy as cross_entropy
from named_embed.demo.model import embedding_table as embedding_table
from named_embed.demo.model import init_model as init_model
from named_embed.demo.page import nearest_chars as nearest_chars
from named_embed.demo.page import render_page as render_page
from named_embed.demo.page import write_page as write_page
from named_embed.demo.progress import ProgressBar as ProgressBar
from named_embed.demo.progress import TrainingLog as TrainingLog
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
from named_embed.demo.text import CharVocabulary as CharVocabulary
from named_embed.demo.text import load_text as load_text
from named_embed.demo.text import windows_at as windows_at
from named_embed.demo.training import generate as generate
from named_embed.demo.training import make_evaluator as make_evaluator
from named_embed.demo.training import make_train_step as make_train_step
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
  "AdamState",
  "CharVocabulary",
  "ModelConfig",
  "ProgressBar",
  "TrainingLog",
  "adam_init",
  "adam_update",
  "build_model",
  "build_parser",
  "cosine_decay",
  "cross_entropy",
  "embedding_table",
  "generate",
  "init_model",
  "load_text",
  "main",
  "make_evaluator",
  "make_train_step",
  "nearest_chars",
  "render_page",
  "run",
  "train",
  "windows_at",
  "write_page",
]

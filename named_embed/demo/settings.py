"""Settings of the demo shared by its modules.

The ``DEFAULT_*`` values are the defaults of `named_embed.demo.run` and of
the command line ``python -m named_embed``; the others are fixed.
"""

from __future__ import annotations

DEFAULT_STEPS = 300
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 256
DEFAULT_LEARNING_RATE = 1e-2
DEFAULT_OUTPUT = "named_embed_demo.html"
DEFAULT_PROMPT = "Once upon a time"
EVAL_WINDOWS = 512
SAMPLE_LENGTH = 80
SAMPLE_TEMPERATURE = 0.6
# For functions run only a few times (initialisation, evaluation, sampling):
# XLA compiles them about twice as fast, and they run slower but still in
# milliseconds. The training step keeps full optimisation.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

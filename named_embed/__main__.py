"""``python -m named_embed``: the package demo (see `named_embed.demo`).

Importing this module runs nothing; only executing it as ``__main__`` does.
"""

from __future__ import annotations

import sys

from named_embed.demo import main

if __name__ == "__main__":
  sys.exit(main())

"""Eight CPU devices for the sharding tests (set before the backend starts)."""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 8)

"""Test configuration: float64 by default, fixed seeds, strict promotion."""

import jax

jax.config.update("jax_enable_x64", True)

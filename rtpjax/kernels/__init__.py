"""Attention: one interface for models, a plain-jnp reference, and the Pallas GPU kernels checked against it."""

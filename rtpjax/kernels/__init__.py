"""Attention: one interface for models, a plain-jnp reference, and the Pallas GPU kernels checked against it."""

SMS = 132  # streaming multiprocessors of the GPUs the default tilings were measured on (H100 SXM, H200)

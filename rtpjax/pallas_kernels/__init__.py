"""Pallas GPU kernels: each registers its function in rtpjax.attention.IMPLEMENTATIONS under its own name."""

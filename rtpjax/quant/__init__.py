"""Quantized matmuls (W8A8 fp8 / int8, int4 weight-only with a Pallas kernel), pre-quantized checkpoint formats and
per-layer KV-cache precision."""

"""Benchmarks, shipped as `rtpjax.benchmarks` so `rtpjax bench serve` works from an installed package."""

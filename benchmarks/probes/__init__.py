"""One-question measurements behind benchmarks/RESULTS.md: each answers why a number is what it is."""

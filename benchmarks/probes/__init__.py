"""One-question measurements behind benchmarks/RESULTS.md: each answers why a number is what it is."""

import json


def report(result: dict, out: str | None) -> None:
    """Print the result as one JSON line and, when asked, write it to `out` for benchmarks/results/."""
    print(json.dumps(result), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

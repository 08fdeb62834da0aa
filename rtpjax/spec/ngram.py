"""Prompt lookup (n-gram) proposals on the host: the tokens that followed the latest earlier occurrence of the
sequence's last n tokens (the longest n from prompt_lookup_max down to prompt_lookup_min that occurs)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def lookup(ids: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens proposed for `ids` (int array of the known tokens); [] when no suffix recurs."""
    length = len(ids)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        # Windows starting at 0 .. length-n-1: every earlier occurrence, the suffix itself excluded.
        windows = sliding_window_view(ids[: length - 1], n)
        hits = np.flatnonzero((windows == ids[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: copy-heavy text repeats its most recent context
            return ids[start : start + k].tolist()
    return []


class NgramProposer:
    """Deterministic proposals (a point mass per draft), so `runner.verify` accepts exactly as rejection sampling."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.n_min, self.n_max = prompt_lookup_min, prompt_lookup_max

    def propose(self, seqs, ks: list[int]) -> list[list[int]]:
        return [lookup(np.asarray(s.token_ids, np.int32), k, self.n_min, self.n_max) if k > 0 else []
                for s, k in zip(seqs, ks)]  # fmt: skip

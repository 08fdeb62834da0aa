"""Prompt lookup (n-gram) proposals on the host: the tokens that followed the latest earlier occurrence of the
sequence's last n tokens (the longest n from prompt_lookup_max down to prompt_lookup_min that occurs).

A proposal runs on the loop's critical path while speculation is on (between reading a step's tokens and launching the
next), so it must cost little against a decode step: one vectorised pass finds the earlier occurrences of the last
token, and only those candidates are extended backwards; each sequence's history is kept as an array that grows by
the tokens added since its last proposal instead of being converted from the token list every round.
"""

from __future__ import annotations

import weakref

import numpy as np


def lookup(ids: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens proposed for `ids` (int array of the known tokens); [] when no suffix recurs."""
    length = len(ids)
    n_top = min(n_max, length - 1)  # the suffix itself is excluded, so an occurrence ends at length - 2 at most
    if n_top < n_min:
        return []
    ends = np.flatnonzero(ids[: length - 1] == ids[length - 1])  # where an earlier occurrence could end
    ends = ends[ends >= n_min - 1]  # room for n_min tokens before it
    if not ends.size:
        return []
    back = np.arange(n_top)
    before = ends[:, None] - back  # [candidates, n_top]: the tokens each candidate's occurrence would end with
    same = (before >= 0) & (ids[np.maximum(before, 0)] == ids[length - 1 - back])
    matched = np.cumprod(same, axis=1).sum(axis=1)  # how many of the suffix's last tokens each candidate repeats
    n = int(matched.max())
    if n < n_min:
        return []
    start = int(ends[matched >= n][-1]) + 1  # the latest occurrence: copy-heavy text repeats its most recent context
    return ids[start : start + k].tolist()


class NgramProposer:
    """Deterministic proposals (a point mass per draft), so `runner.verify` accepts exactly as rejection sampling."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.n_min, self.n_max = prompt_lookup_min, prompt_lookup_max
        # sequence -> (int32 buffer, tokens copied, the token list they came from)
        self._history: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def propose(self, seqs, ks: list[int]) -> list[list[int]]:
        return [lookup(self.history(s), k, self.n_min, self.n_max) if k > 0 else [] for s, k in zip(seqs, ks)]

    def history(self, seq) -> np.ndarray:
        """The sequence's tokens as an array, copying only those added since the last call. A sequence is proposed
        for only when all its tokens are known, and known tokens never change (rejected drafts never enter
        token_ids; a finished sequence's tail is cut), so the copied prefix stays valid while the list is the same
        object and not shorter."""
        ids = seq.token_ids
        n = len(ids)
        buf, have, of = self._history.get(seq, (None, 0, None))
        if of is not ids or have > n:
            buf, have = np.empty(max(64, 2 * n), np.int32), 0
        elif len(buf) < n:
            buf = np.concatenate([buf[:have], np.empty(2 * n - have, np.int32)])
        buf[have:n] = ids[have:n]
        self._history[seq] = (buf, n, ids)
        return buf[:n]

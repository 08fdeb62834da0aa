"""Prompt lookup (n-gram) proposals on the host: the tokens that followed the latest earlier occurrence of the
sequence's last n tokens (the longest n from prompt_lookup_max down to prompt_lookup_min that occurs).

A proposal runs on the loop's critical path while speculation is on (between reading a step's tokens and launching the
next), so it must cost little against a decode step: one vectorised pass finds the earlier occurrences of the last
token, and only those candidates are extended backwards; each sequence's history is kept as an array that grows by
the tokens added since its last proposal instead of being converted from the token list every round.

`device_lookup` is the same lookup on the device, over the token rows the sampler state keeps (runner.sampler): a
chained verify round (spec/chained.py) takes its drafts from it before the host has read the tokens they follow.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
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


def device_lookup(history: jax.Array, length: jax.Array, k: int, n_min: int, n_max: int
                  ) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """`lookup` for rows of tokens on the device: history [R, L] (row r's first length[r] tokens are known) ->
    (drafts [R, k] int32, zero past each row's count; count [R] int32), the same drafts `lookup` gives."""
    rows, width = history.shape
    last = length - 1
    end = jnp.arange(width)[None, :]  # [1, L]: where an earlier occurrence could end
    matched = jnp.ones((rows, width), jnp.int32)
    total = jnp.zeros((rows, width), jnp.int32)
    n_top = jnp.minimum(n_max, last)  # the suffix itself is excluded (as in `lookup`)
    for back in range(n_max):  # the suffix's tokens from its end; matched stays 1 while every one so far agreed
        mine = jnp.take_along_axis(history, jnp.clip(last - back, 0, width - 1)[:, None], axis=1)  # [R, 1]
        theirs = history[:, jnp.clip(end[0] - back, 0, width - 1)]  # [R, L]: the token `back` before each end
        agree = (end - back >= 0) & (theirs == mine) & (back < n_top[:, None])
        matched = matched * agree.astype(jnp.int32)
        total = total + matched
    candidate = (end <= last[:, None] - 1) & (end >= n_min - 1)
    total = jnp.where(candidate, total, 0)
    n = jnp.max(total, axis=1)  # the longest suffix that recurs
    found = (n >= n_min) & (n_top >= n_min)
    latest = jnp.max(jnp.where(candidate & (total >= n[:, None]), end, -1), axis=1)  # its latest occurrence
    start = latest + 1
    count = jnp.where(found, jnp.clip(length - start, 0, k), 0).astype(jnp.int32)
    at = jnp.clip(start[:, None] + jnp.arange(k)[None, :], 0, width - 1)
    drafts = jnp.take_along_axis(history, at, axis=1)
    return jnp.where(jnp.arange(k)[None, :] < count[:, None], drafts, 0).astype(jnp.int32), count


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

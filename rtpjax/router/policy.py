"""Which replica takes a request: round_robin, least_load or cache_aware.

cache_aware predicts each healthy replica's time to first token for this prompt: its queued prompt tokens plus the
prompt's blocks it does not hold (index.PrefixIndex, from the engines' events), costed by that replica's measured
steps (cost.CostModel), and takes the one where that TTFT plus what the choice costs the others is least: the
uncached tokens it must prefill delay each request the replica already holds by their prefill time, so under load a
replica holding the prefix keeps it unless its queue costs more than the prefill another would impose (on an idle
replica the term is zero and the choice is by TTFT alone). The balance guard first sets aside replicas holding more than
`balance_rel` times the least loaded one's outstanding requests plus `balance_abs`, so one hot prefix cannot pile
everything onto one replica while the others idle.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rtpjax.router.index import PrefixIndex
    from rtpjax.router.workers import Worker

POLICIES = ("round_robin", "least_load", "cache_aware")


@dataclasses.dataclass
class Prompt:
    """What routing knows of a request: its prompt's token count and block hashes (empty when it could not tell)."""

    num_tokens: int = 0
    hashes: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Decision:
    worker: Worker
    reason: str  # "round_robin", "least_load", "prefix" (the longest cached prefix), "ttft" (no or equal hits),
    # "balance" (the longest prefix's replica was set aside by the balance guard)
    cached_tokens: int = 0  # of the prompt, predicted cached on that replica


@dataclasses.dataclass
class Policy:
    name: str
    index: PrefixIndex | None = None
    block_size: int = 16
    balance_abs: int = 8
    balance_rel: float = 1.5
    _turn: itertools.count = dataclasses.field(default_factory=itertools.count)

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.name!r}")

    def choose(self, prompt: Prompt, workers: list[Worker]) -> Decision:
        """`workers`: the healthy replicas, at least one."""
        if self.name == "round_robin":
            return Decision(workers[next(self._turn) % len(workers)], "round_robin")
        if self.name == "least_load" or self.index is None:
            return Decision(min(workers, key=lambda w: (w.outstanding(), w.queued_tokens())), "least_load")
        return self._cache_aware(prompt, workers)

    def _cache_aware(self, prompt: Prompt, workers: list[Worker]) -> Decision:
        matched = self.index.match(prompt.hashes, [w.url for w in workers])
        least = min(w.outstanding() for w in workers)
        eligible = [w for w in workers if w.outstanding() <= least * self.balance_rel + self.balance_abs]

        # A replica that has not run enough steps to be measured is costed as a measured peer (same model, same
        # kind of device), not by the prior: an idle replica must not look faster than a busy one for lack of data.
        peer = next((w.cost for w in workers if w.cost.calibrated), None)

        def score(w: Worker) -> float:
            cost = w.cost if w.cost.calibrated or peer is None else peer
            new = prompt.num_tokens - matched[w.url] * self.block_size
            ttft = cost.ttft(w.queued_tokens(cost), new, w.load.get("num_running", 0),
                             w.load.get("max_num_batched_tokens", 0))  # fmt: skip
            return ttft + cost.b * new * w.outstanding()  # the delay its prefill adds to those already there

        best = min(eligible, key=lambda w: (score(w), -matched[w.url], w.outstanding()))
        longest = max(matched.values())
        if longest and matched[best.url] == longest:
            reason = "prefix"
        elif longest and not any(matched[w.url] == longest for w in eligible):
            reason = "balance"
        else:
            reason = "ttft"
        return Decision(best, reason, matched[best.url] * self.block_size)

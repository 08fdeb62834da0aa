"""Which replica takes a request: round_robin, least_load or cache_aware.

cache_aware predicts each healthy replica's time to first token for this prompt: its queued prompt tokens plus the
prompt's blocks it does not hold (index.PrefixIndex, from the engines' events), costed by that replica's measured
steps (cost.CostModel), and takes the one where that TTFT plus what the choice costs the others is least: the
uncached tokens it must prefill delay each request the replica already holds by their prefill time, so under load a
replica holding the prefix keeps it unless its queue costs more than the prefill another would impose (on an idle
replica the term is zero and the choice is by TTFT alone). The balance guard first sets aside replicas holding more than
`balance_rel` times the least loaded one's outstanding requests plus `balance_abs`, so one hot prefix cannot pile
everything onto one replica while the others idle.

A prompt whose longest cached prefix covers at least `sticky_fraction` of it (a conversation's next turn, a long shared
prefix) sticks to the replica holding that prefix unless the replica is clearly overloaded: more outstanding requests
than the least loaded one's times `balance_rel` plus 4 times `balance_abs`, or a predicted TTFT above `sticky_rel` times
the best replica's, both queues costed by the holder's own step times (a noisy fit must not move a conversation).
Moving it would save this request little but leave its history cached where the conversation no longer goes, and copy
it elsewhere by evicting other prefixes. A prompt cached nowhere goes round the replicas about as fast as the best
(`_spread`). The index credits a routed prompt's blocks to its replica at once
(index.PrefixIndex.note_routed), so the next turn sticks before the engine's KV events confirm them.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rtpjax.router.cost import CostModel
    from rtpjax.router.index import PrefixIndex
    from rtpjax.router.workers import Worker

POLICIES = ("round_robin", "least_load", "cache_aware")
SPREAD_PREFILLS = 4  # how much slower than the best a replica may look and still take a cold prompt to spread them


@dataclasses.dataclass
class Prompt:
    """What routing knows of a request: its prompt's token count and block hashes (empty when it could not tell)."""

    num_tokens: int = 0
    hashes: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Decision:
    worker: Worker
    reason: str  # "round_robin", "least_load", "prefix" (a replica with the longest cached prefix), "ttft" (nothing
    # cached anywhere: predicted TTFT alone), "moved" (a replica held a longer prefix but its queue cost more),
    # "balance" (every replica with the longest prefix was set aside by the balance guard)
    cached_tokens: int = 0  # of the prompt, predicted cached on that replica


@dataclasses.dataclass
class Policy:
    name: str
    index: PrefixIndex | None = None
    block_size: int = 16
    balance_abs: int = 8
    balance_rel: float = 1.5
    sticky_fraction: float = 0.3
    sticky_rel: float = 8.0
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

        def own(w: Worker) -> CostModel:
            return w.cost if w.cost.calibrated or peer is None else peer

        def ttft(w: Worker, cost: CostModel) -> float:
            new = prompt.num_tokens - matched[w.url] * self.block_size
            return cost.ttft(w.queued_tokens(cost), new, w.load.get("num_running", 0),
                             w.load.get("max_num_batched_tokens", 0))  # fmt: skip

        def score(w: Worker) -> float:
            cost = own(w)  # plus the delay its prefill adds to those already there
            return ttft(w, cost) + cost.b * (prompt.num_tokens - matched[w.url] * self.block_size) * w.outstanding()

        scores = {w.url: score(w) for w in eligible}
        best = min(eligible, key=lambda w: (scores[w.url], -matched[w.url], w.outstanding()))
        holder = self._holder(prompt, matched, workers, least)
        if holder is not None and holder is not best:
            cost = own(holder)  # both queues costed alike: a noisy fit must not move a conversation
            if ttft(holder, cost) <= self.sticky_rel * ttft(best, cost):
                best = holder
        longest = max(matched.values())
        if not longest:
            best = self._spread(prompt, eligible, scores, best, own(best))
            reason = "ttft"
        elif matched[best.url] == longest:
            reason = "prefix"
        elif not any(matched[w.url] == longest for w in eligible):
            reason = "balance"
        else:
            reason = "moved"
        return Decision(best, reason, matched[best.url] * self.block_size)

    def _spread(self, prompt: Prompt, eligible: list[Worker], scores: dict[str, float], best: Worker,
                cost: CostModel) -> Worker:
        """A prompt cached nowhere goes, among the replicas whose score is within `SPREAD_PREFILLS` times its own
        prefill of the best, to the one sent the fewest blocks lately. Replicas' fitted step costs and queues differ
        by noise; choosing by them bunched cold arrivals on one replica, and a conversation placed there collides
        with its neighbours at every later turn. Spread like this, a burst of new conversations or prefixes goes
        round the replicas (as sglang-router's smallest-tree rule sends it), while a replica clearly busier is
        avoided."""
        slack = SPREAD_PREFILLS * cost.ttft(0, prompt.num_tokens, 0, 0)  # the prompt's prefill on an idle replica
        near = [w for w in eligible if scores[w.url] <= scores[best.url] + slack]
        return min(near, key=lambda w: (self.index.recent(w.url), scores[w.url]))

    def _holder(self, prompt: Prompt, matched: dict[str, int], workers: list[Worker], least: int) -> Worker | None:
        """The replica a prompt sticks to: the one caching the longest prefix of it, where that covers
        `sticky_fraction` of the prompt and the replica is within 4 times the balance guard's slack."""
        room = least * self.balance_rel + 4 * self.balance_abs
        holder = max(workers, key=lambda w: (matched[w.url], w.outstanding() <= room, -w.outstanding()))
        cached = matched[holder.url] * self.block_size
        if not cached or cached < self.sticky_fraction * prompt.num_tokens or holder.outstanding() > room:
            return None
        return holder

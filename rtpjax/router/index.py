"""Which replica holds which prefix: the engines' own block hashes, learned from their KV events.

A replica's entry for a hash is confirmed by its BlockStored event and dropped by BlockRemoved (or AllBlocksCleared,
or a gap in the events). Between routing a request and that request's events arriving, the replica is credited with
the prompt's blocks tentatively, for `tentative_s`: a burst of requests sharing a new prefix then follows the first
one instead of spreading before any event could say where the prefix went, and a conversation's next turn, sent as soon
as the last answer ends, finds its history where that turn went. Apart from that, the index remembers which blocks went
to each replica over the last `sent_s` (`recent`): the load a replica keeps getting from the conversations and
prefixes placed on it, which new prompts are spread by.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from rtpjax.distributed.messages import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class PrefixIndex:
    def __init__(self, tentative_s: float = 5.0, sent_s: float = 30.0):
        self.tentative_s, self.sent_s = tentative_s, sent_s
        self.holders: dict[bytes, set[str]] = {}  # hash -> replicas whose events say they hold it
        self.held: dict[str, set[bytes]] = {}  # replica -> its confirmed hashes
        self.routed: dict[str, dict[bytes, float]] = {}  # replica -> hash -> until when it counts unconfirmed
        # replica -> hash -> until when it counts as sent lately, oldest first (refreshing moves a hash to the end)
        self.sent: dict[str, OrderedDict[bytes, float]] = {}

    def apply(self, worker: str, events: list[KVEvent]) -> None:
        held = self.held.setdefault(worker, set())
        for event in events:
            if isinstance(event, BlockStored):
                for h in event.block_hashes:
                    self.holders.setdefault(h, set()).add(worker)
                    held.add(h)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    self._drop(worker, h)
                    held.discard(h)
            elif isinstance(event, AllBlocksCleared):
                self.forget(worker, tentative=False)
                held = self.held.setdefault(worker, set())

    def forget(self, worker: str, tentative: bool = True) -> None:
        """Drop all that is known of a replica (it restarted, or its events have a gap)."""
        for h in self.held.pop(worker, ()):
            self._drop(worker, h)
        if tentative:
            self.routed.pop(worker, None)
            self.sent.pop(worker, None)

    def note_routed(self, worker: str, hashes: list[bytes]) -> None:
        now = time.monotonic()
        routed, sent = self.routed.setdefault(worker, {}), self.sent.setdefault(worker, OrderedDict())
        for h in hashes:
            routed[h] = now + self.tentative_s
            sent[h] = now + self.sent_s
            sent.move_to_end(h)

    def match(self, hashes: list[bytes], workers: list[str]) -> dict[str, int]:
        """Per replica: how many leading blocks of `hashes` it holds."""
        now, counts = time.monotonic(), {}
        for w in workers:
            routed, n = self.routed.get(w, {}), 0
            for h in hashes:
                if w not in self.holders.get(h, ()) and routed.get(h, 0.0) <= now:
                    break
                n += 1
            counts[w] = n
        return counts

    def recent(self, worker: str) -> int:
        """Distinct blocks sent to a replica in the last `sent_s`."""
        sent, now = self.sent.get(worker), time.monotonic()
        while sent and next(iter(sent.values())) <= now:  # oldest first: only the expired front goes
            sent.popitem(last=False)
        return len(sent) if sent else 0

    def expire(self) -> None:
        """Drop tentative entries past their time (called now and then, not per request), and sent ones."""
        now = time.monotonic()
        for worker, routed in self.routed.items():
            self.routed[worker] = {h: t for h, t in routed.items() if t > now}
        for worker in self.sent:
            self.recent(worker)

    def _drop(self, worker: str, h: bytes) -> None:
        holders = self.holders.get(h)
        if holders is not None:
            holders.discard(worker)
            if not holders:
                del self.holders[h]

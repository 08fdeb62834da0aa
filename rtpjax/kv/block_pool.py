"""KV block accounting on the host: reference counts, free-block LRU, and the prefix cache.

A full block is named by a chained hash (parent block's hash, its tokens, an extra key for adapters or images), so
equal prefixes map to equal hash chains. Freed blocks keep their contents and their hash until they are reused: a
later request with the same prefix takes them back instead of recomputing. Eviction is least-recently-freed first;
`on_evict(block, hash)`, if set, hears of each evicted cached block before it is reused (the KV tiers copy it down).

With KV events on, every change to the prefix cache is also noted in `events` (vLLM's BlockStored / BlockRemoved),
which the engine loop drains once per step: a router learns from them which prefixes each replica holds.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from collections.abc import Sequence

from rtpjax.distributed.messages import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


def block_hash(parent: bytes | None, tokens: list[int], extra: bytes = b"") -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(struct.pack(f"<{len(tokens)}i", *tokens))
    h.update(extra)
    return h.digest()


def prefix_hashes(tokens: list[int], block_size: int, extra: bytes = b"") -> list[bytes]:
    """Hashes of every full block of `tokens`: block_hash's chain, with the tokens packed once (a router hashes every
    prompt it routes)."""
    full = len(tokens) // block_size * block_size
    packed, step = struct.pack(f"<{full}i", *tokens[:full]), 4 * block_size
    hashes, parent = [], b"\0" * 16
    for start in range(0, 4 * full, step):
        parent = hashlib.blake2b(parent + packed[start : start + step] + extra, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    """Blocks 0..num_blocks-1 of the KV cache."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True, kv_events: bool = False):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding that content
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict((b, None) for b in range(num_blocks))
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which found
        self.on_evict = None  # callable(block, hash): a cached block is about to be reused
        # Changes to the prefix cache since the engine last drained them (None: KV events off). An engine's first
        # batch clears what a consumer knew of whatever ran at its address before.
        self.events: list[KVEvent] | None = [AllBlocksCleared()] if kv_events and enable_prefix_caching else None

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (evicting least-recently-freed cached ones), or None if fewer than n are free."""
        if n > len(self.free):
            return None
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            if self.hash_of[block] is not None:
                if self.on_evict is not None:
                    self.on_evict(block, self.hash_of[block])
                del self.cached[self.hash_of[block]]
                if self.events is not None:
                    self.events.append(BlockRemoved([self.hash_of[block]], MEDIUM_GPU))
                self.hash_of[block] = None
            self.ref_count[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Take one more reference on blocks already holding wanted content."""
        for block in blocks:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference each; tail blocks first, so a prefix's later blocks are evicted before its head."""
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, f"block {block} released twice"
            if self.ref_count[block] == 0:
                self.free[block] = None

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The longest run of cached blocks for `hashes`."""
        found = []
        if self.enable_prefix_caching:
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                found.append(block)
        return found

    def count(self, queried: int, hit: int) -> None:
        """An admitted prompt's tokens looked up, and of those found, in the hit statistics (once per admission: a
        sequence that waits for room looks up again)."""
        self.queries += queried
        self.hits += hit

    def register(self, block: int, h: bytes, parent: bytes | None = None, tokens: Sequence[int] = ()) -> None:
        """Publish a block whose content is now complete under its hash (first writer wins). `parent` (the previous
        block's hash) and `tokens` (the block's) only go into its KV event."""
        if self.enable_prefix_caching and self.hash_of[block] is None and h not in self.cached:
            self.cached[h] = block
            self.hash_of[block] = h
            if self.events is not None:
                self._stored(h, parent, tokens)

    def _stored(self, h: bytes, parent: bytes | None, tokens: Sequence[int]) -> None:
        """One BlockStored per run of chained blocks, as vLLM sends them."""
        last = self.events[-1] if self.events else None
        if isinstance(last, BlockStored) and last.block_hashes[-1] == parent:
            last.block_hashes.append(h)
            last.token_ids.extend(tokens)
        else:
            self.events.append(BlockStored([h], parent, list(tokens), len(tokens), None, MEDIUM_GPU, None))

    def drain_events(self) -> list[KVEvent]:
        """The events since the last call (none when KV events are off)."""
        if not self.events:
            return []
        events, self.events = self.events, []
        return events

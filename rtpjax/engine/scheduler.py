"""Which sequences run in the next step, and how many tokens each.

One ragged step mixes decode tokens and prefill chunks under a token budget (max_num_batched_tokens) and a sequence
limit (max_num_seqs). Running sequences go first, in order; when the KV blocks run out the lowest-priority running
sequence is preempted (its blocks are freed and it is recomputed later, giving the same tokens).

Waiting sequences are admitted, reusing cached prefix blocks, only in steps that preempted nothing, in this order:
priority, then (policy lpm, SGLang's) the longest prefix already in the device cache first, then arrival. When the
pool is the bottleneck, sequences that share a resident prefix take a fraction of the blocks of one that brings its
own, so more run at once. A sequence that later arrivals passed in LPM_MAX_PASSES rounds goes first (by arrival), so
none starves; with a queue longer than LPM_MAX_WAITING the order is arrival's alone (the lookups cost grows with the
queue). Beside running sequences, a sequence is admitted only with room for all of its prompt (not
only its first chunk) and the decode headroom's share of its output, and with the room that running sequences' own
chunks still to run and expected output will take left free: a pool filled to the brim by first chunks preempts its
own sequences as their later chunks arrive, and each preemption throws away a prompt's work. Alone, a sequence goes
on chunk by chunk.

The host may schedule a sequence whose last token is still on the device (PENDING): the step reads it there.

A sequence whose K/V arrives from elsewhere (HostKV: an adopted request) is admitted like any other, its loaded blocks
counting as computed: the schedule lists them as block loads, which the runner writes before the step runs.

With KV tiers (kv/tiers), a waiting sequence whose prefix continues below the device first waits "loading" (skipped,
others admitted past it around the room it needs once its rows are in host memory) until those blocks have arrived
on the device (staged outside the cache, off the engine's thread); it is then admitted with them as block loads too
(device-to-device writes: the step waits for no transfer).
While it waits for free blocks after that, it keeps them. While it loads it holds (pins) the blocks of its prefix
still on the device, so eviction cannot shrink that share and make its fetch start again; a sequence before it in
admission order that lacks blocks (if they would make that room), or a running one that must grow, takes those pins
back first (youngest first), so pins never starve anyone. Every round polls every loading sequence,
even past the budget, so a staging that was held back starts as soon as the bound allows.

Speculation: a decoding sequence whose tokens are all known may be given drafts (proposed tokens) to run after its
last token, so the step computes K/V and logits at each of them; `accept` then moves its progress (and blocks) back
to the drafts the target agreed with. A step with drafts (`verify`) holds at most `max_verify_seqs` sequences.
"""

from __future__ import annotations

import bisect
import dataclasses
import time

from rtpjax.kv.block_pool import BlockPool, block_hash
from rtpjax.kv.host_blocks import BlockLoad
from rtpjax.engine.sequence import PENDING, Sequence, Status


LPM_MAX_WAITING = 64  # longer queues are admitted in arrival order: ordering by prefix costs a lookup per sequence
LPM_MAX_PASSES = 32  # admission rounds a waiting sequence may see later arrivals admitted before it (no starvation)


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # tokens already in the cache
    num_tokens: int  # tokens computed in this step
    samples: bool  # the chunk reaches the sequence's end: the step's token for it is kept
    drafts: list[int] = dataclasses.field(default_factory=list)  # proposed tokens: the chunk's last len(drafts)
    chained: bool = False  # scheduled before the previous round was read: the drafts (PENDING) are the device's
    steps: int = 1  # multi-step decode: iterations of its one token, each sampling the next (see `multi_step`)


@dataclasses.dataclass
class Schedule:
    items: list[ScheduledSeq]
    admitted: list[Sequence]  # took a slot this step: their sampler rows must be reset first
    preempted: list[Sequence]
    loads: list[BlockLoad] = dataclasses.field(default_factory=list)  # host K/V to write before the step
    device_drafts: bool = False  # a chained round whose drafts a device proposer left in the sampler state
    steps: int = 1  # > 1: a multi-step decode of up to this many iterations (runner/multi_step.py)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    @property
    def computed(self) -> int:
        """Tokens run through the model over all of the step's iterations."""
        return sum(item.num_tokens * item.steps for item in self.items)

    @property
    def verify(self) -> bool:
        """Some sequence verifies drafts: the runner's verify executables run it."""
        return any(item.drafts for item in self.items)


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_verify_seqs: int = 0, tiers=None, decode_headroom: float = 0.0,
                 policy: str = "lpm", num_scheduler_steps: int = 1):  # fmt: skip
        self.pool = pool
        self.num_scheduler_steps = num_scheduler_steps  # multi-step decode: up to this many iterations per step
        self.decode_headroom = decode_headroom  # share of running sequences' remaining max_tokens kept room for
        if policy not in ("lpm", "fcfs"):
            raise ValueError(f"scheduling policy must be lpm or fcfs, got {policy!r}")
        self.policy = policy  # admission order within a priority: lpm (longest device prefix first) or fcfs
        self.max_verify_seqs = max_verify_seqs
        self.tiers = tiers  # kv.tiers.KVTiers, or None
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival)
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0

    # -- queues ---------------------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: (s.priority, s.arrival_order))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """Leave the engine: blocks and slot go back to the pool."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
            self._drop_fetch(seq)
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.metrics.finished = time.monotonic()

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table, seq.num_computed, seq.num_registered_blocks = [], 0, 0
        self.free_slots.append(seq.slot)
        seq.slot = -1

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        if self.tiers is not None and self.tiers.policy != "recompute":  # swap: its blocks go down at once
            for b in range(seq.num_registered_blocks):
                self.tiers.write_down(seq.block_table[b], seq.block_hashes[b])
        seq.preempted = True
        self._release(seq)
        seq.status = Status.WAITING
        self.add(seq)

    # -- the step -------------------------------------------------------------------------------------------------

    def _tokens_to_run(self, seq: Sequence, budget: int) -> int:
        """How many of the sequence's uncomputed tokens to run now (0: none may run)."""
        remaining = len(seq.token_ids) - seq.num_computed
        if remaining == 1 and (not seq.wants_more() or len(seq.token_ids) >= self.max_model_len):
            return 0  # its last token would only produce a token nobody wants; it finishes when read
        return min(remaining, budget)

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks the sequence lacks for num_computed + num_tokens tokens."""
        return max(0, -(-(seq.num_computed + num_tokens) // self.block_size) - len(seq.block_table))

    def _grow(self, seq: Sequence, num_tokens: int, reserved: int = 0) -> bool:
        """Give the sequence blocks for num_computed + num_tokens tokens, if that leaves `reserved` free."""
        need = self._blocks_needed(seq, num_tokens)
        if need == 0:
            return True
        blocks = self.pool.allocate(need) if need <= self.pool.num_free - reserved else None
        if blocks is None:
            return False
        seq.block_table += blocks
        return True

    def _allowed(self, seq: Sequence) -> int:
        """Tokens the sequence may still generate: up to max_tokens (its first only, for a hand-off) and the context."""
        cap = 1 if seq.hand_off else seq.max_tokens
        return max(0, min(cap - seq.num_generated, self.max_model_len - len(seq.token_ids)))

    def _expected_tokens(self, seq: Sequence) -> int:
        """Tokens whose K/V the sequence is expected to hold at its end: all it has (the prompt's chunks still to run
        included) and the decode headroom's share of what it may still generate (the last token is never computed)."""
        more = int(self.decode_headroom * self._allowed(seq) + 0.5)
        return len(seq.token_ids) + max(0, more - 1)

    def _expected_blocks(self, seq: Sequence, after: int = 0) -> int:
        """Blocks the sequence is expected to take beyond its block table and those covering its first `after`
        tokens."""
        have = max(len(seq.block_table), -(-after // self.block_size))
        return max(0, -(-self._expected_tokens(seq) // self.block_size) - have)

    def _kept_for_running(self) -> int:
        """Blocks admission keeps free for the running sequences: their prompts' chunks still to run (each was
        admitted with room for all of it) and their expected output."""
        return sum(self._expected_blocks(seq, seq.num_computed) for seq in self.running)

    def max_drafts(self, seq: Sequence) -> int:
        """Drafts the sequence could verify now: it decodes (its one uncomputed token known) and every accepted
        draft plus the token after them stays within max_tokens and the context."""
        if len(seq.token_ids) - seq.num_computed != 1 or seq.token_ids[-1] == PENDING:
            return 0
        return max(0, self._room(seq, len(seq.token_ids)))

    def _room(self, seq: Sequence, length: int) -> int:
        """Drafts a sequence of `length` tokens (the last not yet computed) may verify: every accepted draft plus the
        token after them within max_tokens and the context (negative: it may not even take that token)."""
        return min(seq.max_tokens - (length - seq.num_prompt), self.max_model_len - length) - 1

    def schedule(self, drafts: dict[Sequence, list[int]] | None = None) -> Schedule:
        """drafts: proposals for running sequences (see max_drafts); given, the step admits no more sequences than a
        verify step holds."""
        drafts = drafts if drafts and len(self.running) <= self.max_verify_seqs else {}  # a verify step's limit
        schedule = self.multi_step() if not drafts and self.num_scheduler_steps > 1 else None
        if schedule is None:
            items, preempted, budget = self._schedule_running(drafts, self.max_num_batched_tokens)
            admitted: list[Sequence] = []
            loads: list[BlockLoad] = []
            if not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                admitted = self._admit_waiting(items, loads, budget)
            schedule = Schedule(items, admitted, preempted, loads)
        if self.tiers is not None:  # stagings held back start now, oldest first, whatever stopped admission
            for seq in self.waiting:
                if seq.tier_fetch is not None:
                    self.tiers.poll(seq.tier_fetch, room=None)  # the room this round's ask found
        return schedule

    def _schedule_running(self, drafts: dict[Sequence, list[int]], budget: int):
        """The running sequences' next tokens (and drafts to verify) within `budget`, in order, preempting the
        lowest-priority youngest for blocks: (items, preempted, budget left)."""
        items: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._tokens_to_run(seq, budget)
            if n == 0:
                i += 1
                continue
            proposed = drafts.get(seq, [])[: min(self.max_drafts(seq), budget - n)] if n == 1 else []
            kept = self._kept_for_running() - self._expected_blocks(seq, seq.num_computed) if proposed else 0
            if proposed and not self._grow(seq, n + len(proposed), kept):
                proposed = []  # no blocks for the drafts beside what the others are kept: decode plainly rather than
                # preempt for a guess
            while not self._grow(seq, n):
                if self._unpin_youngest():
                    continue  # a loading sequence's pinned prefix goes before a running one is preempted
                victim = max(self.running[i:], key=lambda s: (s.priority, s.arrival_order))
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue  # it preempted itself; running[i] is now the next sequence
            items.append(self._run(seq, n, proposed))
            budget -= n + len(proposed)
            i += 1
        return items, preempted, budget

    def _admit_waiting(self, items: list[ScheduledSeq], loads: list[BlockLoad], budget: int) -> list[Sequence]:
        """Waiting sequences admitted in the policy's order into the step's remaining `budget` (their chunks added to
        `items`, block loads to `loads`), around those whose prefixes are still coming up from a KV tier: the
        admitted."""
        admitted: list[Sequence] = []
        max_items = self.max_verify_seqs if any(item.drafts for item in items) else self.max_num_seqs
        # blocks running sequences are expected to grow into, and those earlier sequences' loads (on their way to
        # the device, or waiting for room) will take
        reserved = self._kept_for_running()
        no_room = self.tiers is None and self.pool.num_free - reserved < 1  # (with tiers, fetches still start)
        order = [] if no_room else self._admission_order()
        for seq in order:
            if budget <= 0 or len(self.running) >= self.max_num_seqs or len(items) >= max_items:
                break
            if seq.token_ids[-1] == PENDING:
                continue  # its last token is read after this step; admit it next time
            if self.tiers is not None and not self._below_ready(seq, reserved):
                fetch = seq.tier_fetch
                if fetch is not None and fetch.ready and not fetch.room:  # it waits for room
                    if self._pins_make_room(seq, self._load_need(seq, reserved), reserved, order):
                        self._unpin_after(seq, order)  # later sequences' pins must not hold it
                reserved += self._reserve_for_load(seq, reserved)
                continue  # its prefix blocks are coming up from a KV tier; others go ahead, around its room
            if self._waits_for_parent(seq):
                continue  # waits for its sibling's prompt, not for blocks (later pins stay)
            if not self._admit(seq, budget, loads, reserved):
                need = self._admission_need(seq, budget, reserved)
                if not (self._pins_make_room(seq, need, reserved, order) and self._unpin_after(seq, order)
                        and self._admit(seq, budget, loads, reserved)):  # fmt: skip
                    break
            admitted.append(seq)
            n = len(seq.token_ids) - seq.num_computed
            items.append(self._run(seq, min(n, budget)))
            budget -= items[-1].num_tokens
            reserved += self._expected_blocks(seq, seq.num_computed)
        if admitted and self.policy == "lpm":
            self._count_passes(admitted)
        return admitted

    def _count_passes(self, admitted: list[Sequence]) -> None:
        """Each waiting sequence that could have been admitted, but saw a later arrival of its priority or a lower
        one admitted instead, was passed over once more (lpm's bound on it)."""
        for seq in self.waiting:
            if seq.token_ids[-1] == PENDING or self._waits_for_parent(seq) or (
                    seq.tier_fetch is not None and not seq.tier_fetch.admissible):  # fmt: skip
                continue  # it could not have been admitted this round anyway
            seq.passed_over += any(a.arrival_order > seq.arrival_order and a.priority >= seq.priority
                                   for a in admitted)  # fmt: skip

    def _waits_for_parent(self, seq: Sequence) -> bool:
        """A forked sequence (n > 1) whose sibling has not computed the prompt they share yet."""
        parent = seq.fork_parent
        return (parent is not None and parent.status is not Status.FINISHED
                and (parent.status is not Status.RUNNING or parent.num_computed < parent.num_prompt))  # fmt: skip

    def _alone(self, reserved: int) -> bool:
        """Nothing runs and no load is on its way: a sequence admitted now may go on chunk by chunk."""
        return not self.running and reserved == 0

    def _admission_need(self, seq: Sequence, budget: int, reserved: int) -> int:
        """The free blocks `_admit` would take for a waiting sequence (its cached prefix blocks that others use cost
        none)."""
        blocks = self.pool.lookup(self._hashes(seq))[: (len(seq.token_ids) - 1) // self.block_size]
        in_use = sum(self.pool.ref_count[b] > 0 for b in blocks)
        end = (min(len(seq.token_ids), len(blocks) * self.block_size + budget) if self._alone(reserved)
               else self._expected_tokens(seq))  # fmt: skip
        return -(-end // self.block_size) - in_use

    def _admission_order(self) -> list[Sequence]:
        """The waiting sequences in the order admission tries them: by priority, then (lpm) those passed over by later
        arrivals LPM_MAX_PASSES times, then the blocks of their prefix the device cache holds, most first, then
        arrival."""
        if self.policy == "fcfs" or len(self.waiting) > LPM_MAX_WAITING:
            return list(self.waiting)

        def resident(seq: Sequence) -> int:
            if seq.token_ids[-1] == PENDING:
                return 0  # not admitted this round (and its hash chain waits for that token)
            return len(self.pool.lookup(self._hashes(seq)[: (len(seq.token_ids) - 1) // self.block_size]))

        def key(seq: Sequence) -> tuple:
            overdue = seq.passed_over >= LPM_MAX_PASSES  # no longer passed: it goes by arrival, before the rest
            return seq.priority, not overdue, 0 if overdue else -resident(seq), seq.arrival_order

        return sorted(self.waiting, key=key)

    def _admit(self, seq: Sequence, budget: int, loads: list[BlockLoad], reserved: int = 0) -> bool:
        """Move a waiting sequence to running with its reusable prefix blocks (and its blocks held on the host), if
        blocks allow its first chunk (beside running sequences: all of its prompt and expected output) and leave
        `reserved` free."""
        shared: list[int] = []
        max_shared = (len(seq.token_ids) - 1) // self.block_size  # at least one token must run to give logits
        parent, looked_up = seq.fork_parent, False
        if parent is not None and parent.status is not Status.FINISHED:
            if self._waits_for_parent(seq):
                return False
            shared = parent.block_table[: min(max_shared, (parent.num_prompt - 1) // self.block_size)]
        else:
            seq.fork_parent = None
            hashes = self._hashes(seq)
            shared, looked_up = self.pool.lookup(hashes)[:max_shared], True
        self.pool.share(shared)
        seq.block_table = list(shared)
        seq.num_computed = len(shared) * self.block_size
        seq.num_registered_blocks = len(shared) if seq.fork_parent is None else 0  # cache hits are published
        if not self._alone(reserved) and self._expected_blocks(seq) > self.pool.num_free - reserved:
            self._unshare(seq)  # beside others it needs room for all of its prompt and its expected output: else its
            return False  # later chunks or tokens would preempt someone (alone, it may go on chunk by chunk)
        load = self._take_host_blocks(seq) if seq.host_kv is not None else None
        tier_ok, tier_load, lookup = (self._take_tier_blocks(seq, max_shared, budget, reserved)
                                      if seq.tier_fetch is not None else (True, None, None))  # fmt: skip
        loaded = len(seq.block_table)
        first_chunk = min(len(seq.token_ids) - seq.num_computed, budget)
        if (seq.host_kv is not None and load is None) or not tier_ok or not self._grow(seq, first_chunk, reserved):
            if tier_load is not None:
                self.tiers.release(tier_load.kv)  # fetched again on the next try
            self._unshare(seq)
            return False  # it keeps waiting (with its host blocks, if any)
        if load is not None:
            self._publish_loaded(seq)
            seq.host_kv = None
            loads.append(load)
        if tier_load is not None:
            for b in range(seq.num_registered_blocks, loaded):  # others admitted in this step share them
                self.pool.register(seq.block_table[b], seq.block_hashes[b])
            seq.num_registered_blocks = loaded
            loads.append(tier_load)
        seq.passed_over = 0
        if looked_up:  # once: a try that did not admit looks up again
            self.pool.count(len(seq.token_ids), len(shared) * self.block_size)
        if lookup is not None:
            self.tiers.count(lookup)  # once: a try that did not admit fetches, and counts, again
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = Status.RUNNING
        seq.slot = self.free_slots.pop()
        if seq.metrics.first_scheduled is None:
            seq.metrics.first_scheduled = time.monotonic()
        return True

    def _unshare(self, seq: Sequence) -> None:
        """Undo an admission that did not go through: its blocks go back."""
        self.pool.release(seq.block_table)
        seq.block_table, seq.num_computed, seq.num_registered_blocks = [], 0, 0

    def _take_host_blocks(self, seq: Sequence) -> BlockLoad | None:
        """Fresh blocks for the host-held blocks that prefix-cache hits did not cover; None if the pool lacks them."""
        host, have = seq.host_kv, len(seq.block_table)
        fresh = self.pool.allocate(max(0, len(host.rows) - have))
        if fresh is None:
            return None
        seq.block_table += fresh
        seq.num_computed = max(seq.num_computed, host.num_computed)
        return BlockLoad(fresh, host.kv, host.rows[have:])

    # -- KV tiers ---------------------------------------------------------------------------------------------------

    def _below_ready(self, seq: Sequence, reserved: int) -> bool:
        """Start, or follow, the fetch of the sequence's prefix blocks found below the device; True once none is in
        flight (nothing below, or every block in host memory). Its rows are staged only if the pool has room for it
        beside `reserved`."""
        if seq.fork_parent is not None or seq.host_kv is not None:
            return True
        hashes = self._hashes(seq)
        max_shared = (len(seq.token_ids) - 1) // self.block_size
        device = self.pool.lookup(hashes)[:max_shared]
        fetch = seq.tier_fetch
        if fetch is not None and len(device) < fetch.start:  # unpinned, and evicted meanwhile: start again
            self._drop_fetch(seq)
            fetch = None
        if fetch is None:  # (a device share grown past its start only skips rows: `_take_tier_blocks`)
            fetch = seq.tier_fetch = self.tiers.fetch(hashes[len(device) : max_shared], len(device), seq.preempted,
                                                      room=False)  # fmt: skip (the room is told just below)
            if fetch is None:
                return True
            self.pool.share(device)
            seq.tier_pin = device
        return self.tiers.poll(fetch, self._load_need(seq, reserved) <= self.pool.num_free - reserved)

    def _load_need(self, seq: Sequence, reserved: int) -> int:
        """The fresh blocks admission will ask for a loading sequence, beside running sequences or `reserved` blocks:
        all of it (its loaded rows, the rest of its prompt and its expected output); alone, or if all of it is more
        than the pool, its loaded rows (the fetch's run, up to max_shared) and its first chunk after them. Less the
        device blocks it pins (unpinned ones, if still cached, are among the free blocks its admission takes back)."""
        fetch, max_shared = seq.tier_fetch, (len(seq.token_ids) - 1) // self.block_size
        computed = min(max_shared, fetch.start + (fetch.valid if fetch.ready else len(fetch.hashes))) * self.block_size
        first = computed + min(len(seq.token_ids) - computed, self.max_num_batched_tokens)  # its first chunk's end
        tokens = max(first, self._expected_tokens(seq))  # all of it, as `_admit` asks beside others
        if self._alone(reserved) or -(-tokens // self.block_size) > self.pool.num_blocks:
            tokens = first
        return -(-tokens // self.block_size) - len(seq.tier_pin)

    def _reserve_for_load(self, seq: Sequence, reserved: int) -> int:
        """Blocks held free for a loading sequence whose rows are in host memory: on their way to the device (the
        pool had room for it when their transfer started), or waiting for that room. Sequences after it in admission
        order must not take them, or it waits for room again once its rows arrive, or waits for room while they take
        every block that frees up (admission in order, as without tiers). 0 for one still gathering its rows (from
        disk, or on their way down) or with room but held by the staging bound (a later load staged before it must be
        admitted to free that bound)."""
        fetch = seq.tier_fetch
        if fetch is None or not (fetch.onloading or (fetch.ready and not fetch.room)):
            return 0
        return max(0, self._load_need(seq, reserved))

    def _pins_make_room(self, seq: Sequence, need: int, reserved: int, order: list[Sequence]) -> bool:
        """The pins of sequences after `seq` in admission order would give it the `need` free blocks it lacks (else
        they are left alone: taking them would restart those sequences' fetches for nothing)."""
        pinned = sum(len(s.tier_pin) for s in order[order.index(seq) + 1 :])
        return pinned > 0 and need <= self.pool.num_free - reserved + pinned

    def _unpin(self, seq: Sequence) -> bool:
        """Give back the device blocks a loading sequence held (they stay cached until evicted)."""
        pinned, seq.tier_pin = seq.tier_pin, []
        self.pool.release(pinned)
        return bool(pinned)

    def _unpin_youngest(self) -> bool:
        """Give back the pins of the youngest waiting sequence that holds any; False if none does."""
        return any(self._unpin(seq) for seq in reversed(self.waiting) if seq.tier_pin)

    def _unpin_after(self, seq: Sequence, order: list[Sequence]) -> bool:
        """`seq` lacks blocks: those pinned by sequences after it in admission order are given back (True if any
        were)."""
        later = order[order.index(seq) + 1 :]
        return any([self._unpin(s) for s in later if s.tier_pin])

    def _hashes(self, seq: Sequence) -> list[bytes]:
        """The hash chain over the sequence's full blocks: the one it carries, extended by blocks completed since (a
        waiting sequence asks every round; its known tokens only grow)."""
        hashes, ids, size = seq.block_hashes, seq.token_ids, self.block_size
        full = len(ids) // size
        del hashes[full:]
        for b in range(len(hashes), full):
            hashes.append(block_hash(hashes[-1] if hashes else None, ids[b * size : (b + 1) * size], seq.extra_key))
        return hashes

    def loading(self) -> int:
        """Waiting sequences whose blocks are still coming up from a KV tier."""
        return sum(s.tier_fetch is not None and not s.tier_fetch.admissible for s in self.waiting)

    def _drop_fetch(self, seq: Sequence) -> None:
        if seq.tier_fetch is not None:
            self.tiers.drop(seq.tier_fetch)
            seq.tier_fetch = None
        self._unpin(seq)

    def _take_tier_blocks(self, seq: Sequence, max_shared: int, budget: int, reserved: int):
        """(ok, load, lookup): fresh blocks for the fetched blocks that follow the device's share, and what was looked
        up below; (False, None, None) if the pool lacks them and the first chunk's blocks (the fetch, staged or not, is
        kept for the next try). They are published and counted only once the sequence is admitted."""
        fetch, have = seq.tier_fetch, len(seq.block_table)
        skip = have - fetch.start
        n = max(0, min(fetch.valid - skip, max_shared - have)) if skip >= 0 else 0
        computed = (have + n) * self.block_size
        first_chunk = min(len(seq.token_ids) - computed, budget)
        if -(-(computed + first_chunk) // self.block_size) - have > self.pool.num_free - reserved:
            return False, None, None
        fresh = self.pool.allocate(n) if n else []
        seq.tier_fetch = None
        self._unpin(seq)  # its block table shares those blocks now
        packed, lookup = self.tiers.take(fetch, max(skip, 0), n)
        if packed is None:
            return True, None, lookup
        seq.block_table += fresh
        seq.num_computed = len(seq.block_table) * self.block_size
        return True, BlockLoad(fresh, packed), lookup

    def _publish_loaded(self, seq: Sequence) -> None:
        """Register the loaded full blocks at once: siblings and other requests admitted in this same step share
        them (the loads run before the step)."""
        full = seq.host_kv.num_computed // self.block_size
        for b in range(seq.num_registered_blocks, full):
            self._register(seq, b, seq.block_hashes)
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def _run(self, seq: Sequence, n: int, drafts: list[int] = ()) -> ScheduledSeq:
        item = ScheduledSeq(seq, seq.num_computed, n + len(drafts), seq.num_computed + n == len(seq.token_ids),
                            list(drafts))  # fmt: skip
        seq.num_computed += item.num_tokens
        if item.samples:
            seq.token_ids.append(PENDING)
        return item

    def multi_step(self) -> Schedule | None:
        """A multi-step decode of the running sequences (runner/multi_step.py): each takes up to num_scheduler_steps
        tokens (fewer where max_tokens or the context end sooner; none for one whose last tokens are already on their
        way), its blocks grown for all of them. None where a plain step is due: a waiting sequence that could be
        admitted (its prefill goes first), a sequence that is not decoding one token, one that may still suppress stop
        tokens (min_tokens) or asks for logprobs, a hand-off, more sequences than a step's tokens, no blocks for
        every iteration (never preempt for one), one token each at most."""
        if self._may_admit():
            return None
        plan = []
        for seq in self.running:
            steps = min(self.num_scheduler_steps, self._allowed(seq))
            if steps < 1:
                continue  # its last token is on its way; it finishes when read
            if len(seq.token_ids) - seq.num_computed != 1 or seq.hand_off:
                return None
            if seq.num_generated < seq.params.min_tokens or seq.params.logprobs is not None:
                return None
            plan.append((seq, steps))
        if max((steps for _, steps in plan), default=1) == 1 or len(plan) > self.max_num_batched_tokens or \
                sum(self._blocks_needed(seq, steps) for seq, steps in plan) > self.pool.num_free:  # fmt: skip
            return None
        items = []
        for seq, steps in plan:
            grown = self._grow(seq, steps)
            assert grown
            items.append(ScheduledSeq(seq, seq.num_computed, 1, True, steps=steps))
            seq.num_computed += steps
            seq.token_ids += [PENDING] * steps
        return Schedule(items, [], [], steps=max(steps for _, steps in plan))

    def _may_admit(self) -> bool:
        """Whether an admission round could admit a waiting sequence now: a free slot, room in the pool, and one whose
        tokens are all known and whose prefix is not still coming up from a KV tier."""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        if self.tiers is None and self.pool.num_free - self._kept_for_running() < 1:
            return False
        return any(seq.token_ids[-1] != PENDING and (seq.tier_fetch is None or seq.tier_fetch.admissible)
                   for seq in self.waiting)  # fmt: skip

    def chain(self, previous: Schedule, ks: dict[Sequence, int]) -> Schedule | None:
        """The next verify round, scheduled before `previous` (a verify round in flight) is read: every running
        sequence goes on from the worst case (all its drafts accepted) with up to ks[seq] drafts the device proposes
        (spec/chained.py; none for a sequence not in ks, or with room for one more token only). None where that
        cannot be done exactly or now: anyone waiting, a sequence that did not decode in `previous`, one that may
        still suppress stop tokens (min_tokens) or may reach its end in `previous`, no drafts for anyone, more tokens
        than a step's budget, no blocks for the worst case; the round is then scheduled after reading, as usual."""
        items = {item.seq: item for item in previous.items}
        if self.waiting or not self.running or len(self.running) > self.max_verify_seqs:
            return None
        plan = []
        for seq in self.running:
            item = items.get(seq)
            if item is None or not item.samples or item.num_tokens != 1 + len(item.drafts) or seq.hand_off:
                return None
            if seq.num_generated - 1 < seq.params.min_tokens:  # the known tokens (PENDING excluded)
                return None
            room = self._room(seq, len(seq.token_ids) + len(item.drafts))  # once `previous` accepted everything
            if room < 0:
                return None
            plan.append((seq, min(ks.get(seq, 0), room)))
        if not any(k for _, k in plan) or sum(1 + k for _, k in plan) > self.max_num_batched_tokens:
            return None
        if sum(self._blocks_needed(seq, 1 + k) for seq, k in plan) > self.pool.num_free:
            return None  # never preempt for a guess
        chained = []
        for seq, k in plan:
            assert self._grow(seq, 1 + k)
            chained.append(ScheduledSeq(seq, seq.num_computed, 1 + k, True, [PENDING] * k, chained=True))
            seq.num_computed += 1 + k
        return Schedule(chained, [], [])

    def accept(self, item: ScheduledSeq, tokens: list[int], then: ScheduledSeq | None = None) -> None:
        """A verify step's outcome for one sequence: `tokens` (its accepted drafts and the target's next token)
        replace its PENDING token; K/V of rejected drafts no longer count, and blocks only they used go back.
        then: the sequence's chained round in flight (see `chain`), moved back to start at the last of `tokens`."""
        seq = item.seq
        end = item.start + item.num_tokens - len(item.drafts)  # the PENDING token's index
        assert seq.token_ids[end:] == [PENDING] and 1 <= len(tokens) <= len(item.drafts) + 1
        seq.token_ids[end:] = tokens
        seq.num_computed = end + len(tokens) - 1
        if then is not None:
            then.start = seq.num_computed
            seq.num_computed += then.num_tokens
            seq.token_ids.append(PENDING)
        keep = -(-seq.num_computed // self.block_size)
        self.pool.release(seq.block_table[keep:])  # fresh blocks this step grew into: never shared nor published
        del seq.block_table[keep:]

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed blocks to the prefix cache (only blocks whose tokens are known)."""
        known, ids, size = min(seq.num_computed, len(seq.token_ids)), seq.token_ids, self.block_size
        if known // size <= seq.num_registered_blocks:
            return  # no block completed since the last call (most steps)
        while known and ids[known - 1] == PENDING:  # tokens still on the device are the last few
            known -= 1
        full = known // size
        if full <= seq.num_registered_blocks:
            return
        hashes = seq.block_hashes  # the chain grows by the new blocks only, not rehashed from the start
        for b in range(len(hashes), full):
            hashes.append(block_hash(hashes[-1] if hashes else None, ids[b * size : (b + 1) * size], seq.extra_key))
        for b in range(seq.num_registered_blocks, full):
            self._register(seq, b, hashes)
        seq.num_registered_blocks = full

    def _register(self, seq: Sequence, b: int, hashes: list[bytes]) -> None:
        size = self.block_size
        self.pool.register(seq.block_table[b], hashes[b], hashes[b - 1] if b else None,
                           seq.token_ids[b * size : (b + 1) * size])  # fmt: skip

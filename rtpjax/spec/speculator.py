"""The engine's side of speculation: whether a step speculates, how many drafts each sequence gets, and counters.

Policy: no drafts while more than `disable_by_batch_size` sequences run or wait (a large batch's step is
compute-bound: rejected drafts would cost more than accepted ones save), nor for requests that opted out
(`SamplingParams.speculative=False`). A sequence whose recent drafts were mostly rejected proposes one token at a
time until its acceptance recovers. When the proposer finds nothing (text that does not repeat), the steps after
it run without speculation, and so fully overlapped, for a span that doubles with each empty proposal round (up to
MAX_SKIP steps) and resets as soon as a round yields drafts: synchronising every step for proposals that never come
would cost throughput for nothing. Chained rounds (spec/chained.py) count as proposal rounds the same way, by
what the device's lookup (or a device proposer) found.
"""

from __future__ import annotations

import dataclasses

from rtpjax.spec.config import SpeculativeConfig

_DECAY = 0.7  # weight of a sequence's acceptance history against its latest verify step
MAX_SKIP = 16  # steps without speculation after repeated empty proposal rounds


@dataclasses.dataclass
class SpecCounters:
    """Since the engine started (vLLM's spec_decode_* counters)."""

    num_drafts: int = 0  # verify rows with at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = dataclasses.field(default_factory=list)  # [K]: drafts accepted at each position

    def report(self) -> str:
        if not self.num_drafts:
            return "no drafts"
        return (f"{self.num_accepted_tokens / self.num_draft_tokens:.0%} of {self.num_draft_tokens} drafts accepted, "
                f"mean acceptance length {1 + self.num_accepted_tokens / self.num_drafts:.2f}")  # fmt: skip


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer):
        self.config, self.proposer = config, proposer
        self.counters = SpecCounters(accepted_per_pos=[0] * config.num_speculative_tokens)
        self.empty_rounds = 0  # consecutive proposal rounds that found no drafts
        self.skip = 0  # steps left to run without speculation

    def active(self, scheduler) -> bool:
        """Whether the next step may verify drafts (then the loop reads each step's tokens before the next, giving up
        the overlap of scheduling with the device; so not while no running sequence would take drafts)."""
        if self.skip > 0:
            self.skip -= 1
            return False
        running = scheduler.running
        return (len(running) + len(scheduler.waiting) <= self.config.disable_by_batch_size
                and any(seq.params.speculative for seq in running))  # fmt: skip

    def drafts(self, scheduler) -> dict:
        """Proposals for the running sequences that may verify drafts now."""
        seqs, ks = [], []
        for seq in scheduler.running:
            k = min(self._k(seq), scheduler.max_drafts(seq)) if seq.params.speculative else 0
            if k > 0:
                seqs.append(seq)
                ks.append(k)
        found = {seq: d for seq, d in zip(seqs, self.proposer.propose(seqs, ks)) if d} if seqs else {}
        self.note_round(bool(found))
        return found

    def note_round(self, found: bool) -> None:
        """A proposal round's outcome (the host's, or a chained round's on the device): see the module's policy."""
        if found:
            self.empty_rounds = 0
        else:
            self.empty_rounds += 1
            self.skip = min(2 ** (self.empty_rounds - 1), MAX_SKIP)

    def chain_ks(self, running) -> dict:
        """Drafts each running sequence may verify in a chained round (spec/chained.py: the device proposes them).
        Every one of them costs a token in the step whether the lookup finds it or not, so a sequence whose latest
        round found none makes room for one only."""
        return {seq: self._k(seq) if seq.drafts_found else 1 for seq in running if seq.params.speculative}

    def release_finished(self) -> None:
        """Proposers that keep state per sequence (a draft model's KV blocks) let go of finished ones."""
        release = getattr(self.proposer, "release_finished", None)
        if release is not None:
            release()

    def observe(self, aux, slots) -> None:
        """Proposers that read the target's hidden states (EAGLE-3) take each step's, as it is queued, with the
        cache slots of its tokens."""
        observe = getattr(self.proposer, "observe", None)
        if observe is not None:
            observe(aux, slots)

    def warm(self, state):
        """After the engine's warm-up: proposers with programs over the sampler state compile and run them once
        against it; returns the state."""
        warm = getattr(self.proposer, "warm", None)
        return state if warm is None else warm(state)

    def _k(self, seq) -> int:
        return self.config.num_speculative_tokens if seq.draft_acceptance >= self.config.min_acceptance_rate else 1

    def record(self, seq, num_drafts: int, accepted: int) -> None:
        c = self.counters
        c.num_drafts += 1
        c.num_draft_tokens += num_drafts
        c.num_accepted_tokens += accepted
        for pos in range(accepted):
            c.accepted_per_pos[pos] += 1
        seq.draft_acceptance = _DECAY * seq.draft_acceptance + (1 - _DECAY) * accepted / num_drafts

    def stats(self) -> dict:
        """The counters as EngineStats fields."""
        c = self.counters
        return dict(spec_decode_num_drafts=c.num_drafts, spec_decode_num_draft_tokens=c.num_draft_tokens,
                    spec_decode_num_accepted_tokens=c.num_accepted_tokens,
                    spec_decode_num_accepted_tokens_per_pos=list(c.accepted_per_pos))  # fmt: skip


def make_speculator(config: SpeculativeConfig | None, ctx=None, target_embed=None) -> Speculator | None:
    """ctx: a DraftContext (the target's sizes), which model-based proposers need; target_embed: the target's
    embedding, which an EAGLE-3 head without its own shares."""
    if config is None:
        return None
    if config.method == "eagle3":
        from rtpjax.spec.eagle3 import Eagle3Proposer

        return Speculator(config, Eagle3Proposer(config.model, config.num_speculative_tokens, ctx, target_embed))
    if config.method == "draft_model":
        from rtpjax.spec.draft_model import DraftModelProposer

        return Speculator(config, DraftModelProposer(config.model, config.num_speculative_tokens, ctx))
    from rtpjax.spec.ngram import NgramProposer

    return Speculator(config, NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max))

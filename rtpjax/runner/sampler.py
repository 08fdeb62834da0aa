"""Sampling on the device, with every request's own parameters in one batch.

Penalties need each request's token history; it lives on the device in per-slot rows (a running request owns one slot)
that are reset when a request is admitted and updated with every sampled token, so the host never ships histories.
Randomness is keyed by (request seed, completion index, output position): a seeded request draws the same tokens
whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rtpjax.sampling_params import MAX_LOGPROBS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    """Rows indexed by slot; the last row is a sink for padding."""

    last_token: jax.Array  # [slots+1] int32: each slot's latest sampled token (the next step's input)
    prompt_seen: jax.Array  # [slots+1, V] bool: prompt tokens (repetition penalty)
    output_counts: jax.Array  # [slots+1, V] int32: generated tokens (all three penalties)
    # [slots+1, L] int32 and [slots+1]: each slot's tokens (prompt and sampled), where chained verify rounds
    # (spec/chained.py) look up their drafts; L = 0 in engines without them.
    history: jax.Array
    history_len: jax.Array
    # [slots+1, K] int32 and [slots+1]: drafts a device proposer left for each slot's next chained round (the round
    # before it not read yet: spec/chained.py); K = 0 in engines without chained rounds.
    proposals: jax.Array
    num_proposals: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    """Per sequence of the step, [S] unless noted. Padding sequences use the sink slot and sample greedily."""

    slot: jax.Array
    samples: jax.Array  # bool: this sequence's chunk ends its known tokens, so its token is kept
    temperature: jax.Array  # 0 -> greedy
    top_k: jax.Array  # 0 -> vocabulary
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array  # uint32
    index: jax.Array  # completion index within its request (n > 1)
    position: jax.Array  # how many tokens this sequence has generated before this one
    suppress: jax.Array  # [S, K] token ids masked out (EOS/stop ids before min_tokens), -1 for none
    logprobs: jax.Array  # bool: this sequence reports top logprobs


@dataclasses.dataclass(frozen=True)
class Variant:
    """Which optional stages a step's sampler runs, chosen on the host from the step's requests; each variant is its
    own executable. (As lax.cond gates on the device, XLA reads each predicate back to the host: the next step could
    be queued only after this one's logits existed. H100, 8B, batch 32: dispatch blocked 7 ms of a 9 ms step.)"""

    mode: str = "filtered"  # "greedy": argmax only; "random": temperature + Gumbel noise; "filtered": + top-k/p, min-p
    logprobs: bool = True  # the top-MAX_LOGPROBS alternatives


# Penalties always run: at neutral values they change no bit, and their [S, V] gathers did not show in decode speed
# (H100, 8B, batch 32: 4277 tok/s with them always on, 4258 as a variant), while a variant each doubled the
# executables (warm start 13.5 -> 19.1 s).
VARIANTS = tuple(Variant(m, lp) for m in ("greedy", "random", "filtered") for lp in (False, True))


def variant_for(s: SamplingInputs) -> Variant:
    """The cheapest variant that serves every sequence of a step (host arrays; padding rows are neutral)."""
    drawn = s.temperature > 0
    if not drawn.any():
        mode = "greedy"
    elif (drawn & ((s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0))).any():
        mode = "filtered"
    else:
        mode = "random"
    return Variant(mode, bool(s.logprobs.any()))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    tokens: jax.Array  # [S] int32
    logprob: jax.Array  # [S] float32, of the sampled token under the model's distribution
    top_ids: jax.Array  # [S, MAX_LOGPROBS] int32
    top_logprobs: jax.Array  # [S, MAX_LOGPROBS] float32
    # [S] int32: drafts accepted per sequence. A verify step (rtpjax.runner.verify) has K+1 rows per sequence in the
    # fields above (row-major) and keeps the first num_accepted + 1; a plain step has one row and zeros here.
    num_accepted: jax.Array
    num_drafts: jax.Array  # [S] int32: drafts verified per sequence (a chained round's come from the device)


def init_state(num_slots: int, vocab_size: int, history: int = 0, proposals: int = 0) -> SamplerState:
    """history: tokens kept per slot (the context length where chained verify rounds need them, else 0);
    proposals: drafts per slot a device proposer may leave for a chained round (K there, else 0)."""
    return SamplerState(
        last_token=jnp.zeros(num_slots + 1, jnp.int32),
        prompt_seen=jnp.zeros((num_slots + 1, vocab_size), jnp.bool_),
        output_counts=jnp.zeros((num_slots + 1, vocab_size), jnp.int32),
        history=jnp.zeros((num_slots + 1, history), jnp.int32),
        history_len=jnp.zeros(num_slots + 1, jnp.int32),
        proposals=jnp.zeros((num_slots + 1, proposals), jnp.int32),
        num_proposals=jnp.zeros(num_slots + 1, jnp.int32),
    )


def admit(state: SamplerState, rows, tokens, token_rows, is_output) -> SamplerState:
    """Clear the rows of newly admitted sequences, then record their known tokens (padding rows/tokens = sink; a
    row's tokens are contiguous and in order)."""
    sink = state.last_token.shape[0] - 1
    prompt_seen = state.prompt_seen.at[rows].set(False)
    counts = state.output_counts.at[rows].set(0)
    prompt_rows = jnp.where(is_output, sink, token_rows)
    output_rows = jnp.where(is_output, token_rows, sink)
    prompt_seen = prompt_seen.at[prompt_rows, tokens].set(True)
    counts = counts.at[output_rows, tokens].add(1)
    history, history_len = state.history, state.history_len
    if history.shape[1]:
        t = jnp.arange(tokens.shape[0])
        first = jnp.concatenate([jnp.ones(1, bool), token_rows[1:] != token_rows[:-1]])
        position = t - jax.lax.cummax(jnp.where(first, t, 0))  # within its row's run
        history = history.at[token_rows, position].set(tokens, mode="drop")
        history_len = history_len.at[rows].set(0).at[token_rows].add(1).at[sink].set(0)
    return dataclasses.replace(state, prompt_seen=prompt_seen.at[sink].set(False), output_counts=counts.at[sink].set(0),
                               history=history, history_len=history_len)  # fmt: skip


def append_history(state: SamplerState, slot, tokens, keep) -> tuple[jax.Array, jax.Array]:
    """The slots' token rows with `tokens` [S, N] appended where `keep` [S, N] (a prefix of each row) says; slot [S]
    (padding: the sink)."""
    if not state.history.shape[1]:
        return state.history, state.history_len
    sink = state.last_token.shape[0] - 1
    at = state.history_len[slot][:, None] + jnp.arange(tokens.shape[1])[None, :]
    rows = jnp.where(keep, slot[:, None], sink)
    history = state.history.at[rows, at].set(tokens, mode="drop")
    return history, state.history_len.at[slot].add(jnp.sum(keep, axis=1, dtype=jnp.int32)).at[sink].set(0)


def _apply_penalties(logits, counts, seen, s: SamplingInputs):
    """counts: [S, V] tokens generated before each row's token; seen: those or the prompt's."""
    rep = s.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - s.frequency_penalty[:, None] * counts
    return logits - s.presence_penalty[:, None] * (counts > 0)


def _filter(scaled, s: SamplingInputs):
    """Mask (to -inf) what top-k, top-p and min-p exclude; ties at a threshold are kept."""
    vocab = scaled.shape[-1]
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(mass_before < s.top_p[:, None], axis=-1)  # >= 1
    pth = jnp.take_along_axis(ordered, (keep - 1)[:, None], axis=-1)
    # top_p = 1 keeps everything: the float32 running sum can pass 1 before the tail and would drop it, making a
    # row's draws depend on whether another row in its step asked for filtering.
    pth = jnp.where(s.top_p[:, None] < 1, pth, -jnp.inf)
    mth = ordered[:, :1] + jnp.log(jnp.maximum(s.min_p[:, None], 1e-30))
    threshold = jnp.maximum(jnp.maximum(kth, pth), jnp.where(s.min_p[:, None] > 0, mth, -jnp.inf))
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _noise(s: SamplingInputs, vocab: int):
    def row(seed, index, position):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), position)
        return jax.random.gumbel(key, (vocab,), jnp.float32)

    return jax.vmap(row)(s.seed, s.index, s.position)


def draw(logits: jax.Array, counts: jax.Array, seen: jax.Array, s: SamplingInputs, variant: Variant) -> SampleOutput:
    """One token per row of logits [S, V] float32, given each row's history (`_apply_penalties`); no state change.

    Stages the variant leaves out would be exact no-ops for these rows (greedy rows, no logprobs asked).
    """
    num_seqs, vocab = logits.shape
    logprobs = jax.nn.log_softmax(logits, axis=-1)  # reported under the model's own distribution
    x = _apply_penalties(logits, counts, seen, s)
    rows = jnp.arange(num_seqs)[:, None]
    x = x.at[rows, s.suppress].set(-jnp.inf, mode="drop")
    greedy = s.temperature <= 0
    tokens = jnp.argmax(x, axis=-1)
    if variant.mode != "greedy":
        scaled = x / jnp.where(greedy, 1.0, s.temperature)[:, None]
        if variant.mode == "filtered":
            scaled = _filter(scaled, s)
        tokens = jnp.where(greedy, tokens, jnp.argmax(scaled + _noise(s, vocab), axis=-1))
    tokens = tokens.astype(jnp.int32)
    if variant.logprobs:
        top_logprobs, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    else:
        top_logprobs = jnp.zeros((num_seqs, MAX_LOGPROBS), jnp.float32)
        top_ids = jnp.zeros((num_seqs, MAX_LOGPROBS), jnp.int32)
    return SampleOutput(
        tokens=tokens,
        logprob=jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0],
        top_ids=top_ids.astype(jnp.int32),
        top_logprobs=top_logprobs,
        num_accepted=jnp.zeros(num_seqs, jnp.int32),
        num_drafts=jnp.zeros(num_seqs, jnp.int32),
    )


def sample(logits: jax.Array, state: SamplerState, s: SamplingInputs, variant: Variant = Variant()
           ) -> tuple[SampleOutput, SamplerState]:  # fmt: skip
    """logits: [S, V] float32 -> one token per sequence; records kept tokens into the state."""
    counts = state.output_counts[s.slot]  # [S, V]
    out = draw(logits, counts, state.prompt_seen[s.slot] | (counts > 0), s, variant)
    sink = state.last_token.shape[0] - 1
    slot = jnp.where(s.samples, s.slot, sink)
    history, history_len = append_history(state, slot, out.tokens[:, None], s.samples[:, None])
    state = dataclasses.replace(
        state,
        last_token=state.last_token.at[slot].set(out.tokens),
        output_counts=state.output_counts.at[slot, out.tokens].add(1).at[sink].set(0),
        history=history,
        history_len=history_len,
    )
    return out, state

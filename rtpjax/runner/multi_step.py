"""Multi-step decode (`--num-scheduler-steps K`, vLLM's spelling): K decode steps of every running sequence in one
launch, each iteration's tokens sampled on the device and fed to the next.

Where a small batch's step costs the host about as much as the device (scheduling, building inputs, launching,
reading tokens), that work is paid once per K tokens. Iteration j is a plain decode step one position further: the
K/V slot from the sequence's block table, the context one longer, the sampler row's output position j further (which
keys seeded noise), the penalties over the tokens sampled before it. So the tokens are exactly those of K plain steps,
greedy, seeded and penalised alike.

A sequence with fewer iterations left (max_tokens, the context: `steps`) repeats its last position past them, writing
no K/V and sampling nothing; the host drops those rows. One that stops early (EOS, a stop string) wastes the rest of
its iterations, which the host drops as it reads them (as it drops a pipelined plain step's token after a stop).
The iterations are unrolled, as the draft model's guesses are (spec/draft_model.py): a device-side loop would read its
predicate back to the host each time round.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rtpjax.runner import sampler

# The most sequences a multi-step decode holds: the host's share of a step is largest in small batches, and each
# sequence bucket's program is K model steps to compile.
MAX_SEQS = 32
# Variants multi-step programs are compiled for (each bucket's program is K model steps to compile): greedy, and one
# that serves every other request without logprobs; a step whose requests ask for logprobs decodes plainly.
VARIANTS = (sampler.Variant("greedy", False), sampler.Variant("filtered", False))


def variant_for(s: sampler.SamplingInputs) -> sampler.Variant:
    """The multi-step variant that serves a step's requests (host arrays)."""
    return VARIANTS[0] if sampler.variant_for(s).mode == "greedy" else VARIANTS[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiStepInputs:
    """A decode step laid out on the host as its first iteration, and how many iterations each sequence takes."""

    batch: object  # runner.model_runner.StepBatch: one token per sequence, token i sequence i's
    steps: jax.Array  # [S] int32, 1..K for a sequence, 0 for padding


def iteration(batch, steps: jax.Array, j: int, block_size: int):
    """The StepBatch of iteration j: each sequence's token j positions further (a sequence past its steps stays at
    its last one and writes nothing); its tokens are filled in by the caller."""
    meta = batch.meta
    num_tokens, num_seqs = batch.tokens.shape[0], meta.seq_lens.shape[0]
    seq = jnp.minimum(jnp.arange(num_tokens), num_seqs - 1)
    real = (jnp.arange(num_tokens) < num_seqs) & (steps[seq] > 0)
    ahead = jnp.minimum(j, jnp.maximum(steps - 1, 0))  # [S]
    positions = batch.positions + jnp.where(real, ahead[seq], 0)
    block = meta.block_tables[seq, jnp.minimum(positions // block_size, meta.block_tables.shape[1] - 1)]
    slots = jnp.where(real & (j < steps[seq]), block * block_size + positions % block_size, -1)
    meta = dataclasses.replace(meta, seq_lens=meta.seq_lens + ahead, slot_mapping=slots, plan={})
    return dataclasses.replace(batch, positions=positions, meta=meta), real, seq


def multi_step(params, cache, state, flat, flat_sampling, packing, sampling_packing, variant: sampler.Variant, *,
               cfg, forward, block_size: int, k: int):  # fmt: skip
    """K decode iterations: (SampleOutput with K rows per sequence, sequence-major, and num_accepted = steps - 1;
    the cache; the sampler state). MoE: the expert load summed over the iterations comes last."""
    m: MultiStepInputs = packing.unpack(flat)
    s: sampler.SamplingInputs = sampling_packing.unpack(flat_sampling)
    b = m.batch
    tokens = jnp.where(b.token_slot >= 0, state.last_token[b.token_slot], b.tokens)
    extra = dict(expert_load=True) if cfg.num_experts else {}
    outs, load = [], None
    for j in range(k):
        step, real, seq = iteration(b, m.steps, j, block_size)
        if j:
            tokens = jnp.where(real, state.last_token[s.slot[seq]], 0)
        logits, cache, *rest = forward(params, cfg, tokens, step.positions, cache, step.meta, b.logits_indices,
                                       **extra)  # fmt: skip
        if rest:
            load = rest[0] if load is None else load + rest[0]
        rows = dataclasses.replace(s, position=s.position + j, samples=s.samples & (j < m.steps))
        out, state = sampler.sample(logits, state, rows, variant)
        outs.append(out)
    num_seqs = m.steps.shape[0]
    out = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1).reshape(num_seqs * k, *xs[0].shape[1:]), *outs)
    out = dataclasses.replace(out, num_accepted=jnp.maximum(m.steps - 1, 0), num_drafts=jnp.zeros_like(m.steps))
    return (out, cache, state) + ((load,) if load is not None else ())

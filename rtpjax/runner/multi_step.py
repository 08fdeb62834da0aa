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
The iterations are a device-side loop (`lax.scan`) over one compiled iteration: its trip count is static, so XLA
runs it without reading a predicate back, and the program compiles one iteration rather than K. A launch of K
iterations costs the host about what a plain step's launch does (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from rtpjax.runner import sampler

# Variants multi-step programs are compiled for (one program per variant and bucket): greedy, and one that serves
# every other request without logprobs; a step whose requests ask for logprobs decodes plainly.
VARIANTS = (sampler.Variant("greedy", False), sampler.Variant("filtered", False))
# For benchmarks: RTPJAX_MULTI_STEP_UNROLL=1 compiles the K iterations unrolled into one program instead of a loop
# (read at import: every process of a multi-host engine needs the same value).
UNROLL = os.environ.get("RTPJAX_MULTI_STEP_UNROLL", "0") == "1"


def variant_for(s: sampler.SamplingInputs) -> sampler.Variant:
    """The multi-step variant that serves a step's requests (host arrays)."""
    return VARIANTS[0] if sampler.variant_for(s).mode == "greedy" else VARIANTS[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiStepInputs:
    """A decode step laid out on the host as its first iteration, and how many iterations each sequence takes."""

    batch: object  # runner.model_runner.StepBatch: one token per sequence, token i sequence i's
    steps: jax.Array  # [S] int32, 1..K for a sequence, 0 for padding


def iteration(batch, steps: jax.Array, j: int | jax.Array, block_size: int):
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
    extra = dict(expert_load=True) if cfg.num_experts else {}

    def one(carry, j):
        cache, state, tokens = carry
        step, real, seq = iteration(b, m.steps, j, block_size)
        logits, cache, *rest = forward(params, cfg, tokens, step.positions, cache, step.meta, b.logits_indices,
                                       **extra)  # fmt: skip
        rows = dataclasses.replace(s, position=s.position + j, samples=s.samples & (j < m.steps))
        out, state = sampler.sample(logits, state, rows, variant)
        tokens = jnp.where(real, state.last_token[s.slot[seq]], 0)  # the next iteration's
        return (cache, state, tokens), (out, *rest)

    first = jnp.where(b.token_slot >= 0, state.last_token[b.token_slot], b.tokens)
    js = jnp.arange(k, dtype=jnp.int32)
    (cache, state, _), (outs, *loads) = jax.lax.scan(one, (cache, state, first), js, unroll=k if UNROLL else 1)
    num_seqs = m.steps.shape[0]
    out = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(num_seqs * k, *x.shape[2:]), outs)
    out = dataclasses.replace(out, num_accepted=jnp.maximum(m.steps - 1, 0), num_drafts=jnp.zeros_like(m.steps))
    return (out, cache, state) + tuple(load.sum(axis=0) for load in loads)

"""Incremental decoding through the paged KV cache gives the logits of one full pass, however the tokens are split."""

import numpy as np
import pytest

from rtpjax.kv import kv_cache
from rtpjax.runner.greedy import jit_forward
from rtpjax.loading.model_source import load_model
from rtpjax.runner.step_inputs import SeqChunk, build_step

BLOCK = 4


def run_schedule(cfg, family, params, seqs, schedule, num_tokens=16, num_seqs=4):
    """Feed each sequence's tokens in the chunk sizes `schedule` gives, several sequences per step.

    schedule: list of steps, each a dict {seq index: chunk length}. Returns every token's logits per sequence.
    """
    forward = jit_forward(family)
    tables, next_block = [], 0
    for s in seqs:  # interleave blocks of different sequences to catch table mix-ups
        n = -(-len(s) // BLOCK)
        tables.append(list(range(next_block, next_block + 2 * n, 2)))
        next_block += 2 * n
    cache = kv_cache.allocate(cfg, next_block + 1, BLOCK)
    done = [0] * len(seqs)
    out = [[] for _ in seqs]
    for step in schedule:
        ids = list(step)
        chunks = [SeqChunk(seqs[i][done[i] : done[i] + step[i]], done[i], tables[i]) for i in ids]
        inputs = build_step(chunks, BLOCK, num_tokens=num_tokens, num_seqs=num_seqs, max_blocks=8)
        logits, cache = forward(params, cfg, inputs.tokens, inputs.positions, cache, inputs.meta)
        logits = np.asarray(logits)
        offset = 0
        for i in ids:
            out[i].append(logits[offset : offset + step[i]])
            offset += step[i]
            done[i] += step[i]
    assert done == [len(s) for s in seqs]
    return [np.concatenate(o) for o in out]


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen3_moe"])
def test_incremental_matches_full_pass(name, tiny_checkpoints):
    cfg, family, params = load_model(tiny_checkpoints[name])
    rng = np.random.default_rng(3)
    a, b = (rng.integers(3, cfg.vocab_size, 13).tolist() for _ in range(2))
    full = run_schedule(cfg, family, params, [a, b], [{0: 13}, {1: 13}])

    token_by_token = run_schedule(cfg, family, params, [a], [{0: 5}] + [{0: 1}] * 8)
    uneven = run_schedule(cfg, family, params, [a], [{0: 3}, {0: 1}, {0: 6}, {0: 2}, {0: 1}])
    # Prefill chunks of one sequence batched with decode tokens of another, as the engine will run them.
    mixed = run_schedule(cfg, family, params, [a, b], [{0: 4}, {0: 1, 1: 7}, {0: 5, 1: 1}, {0: 3, 1: 5}])
    for got in (token_by_token[0], uneven[0], mixed[0]):
        np.testing.assert_allclose(got, full[0], rtol=0, atol=2e-5 * np.abs(full[0]).max())
    np.testing.assert_allclose(mixed[1], full[1], rtol=0, atol=2e-5 * np.abs(full[1]).max())


def test_padding_tokens_do_not_touch_the_cache(tiny_checkpoints):
    cfg, family, params = load_model(tiny_checkpoints["llama3"])
    cache = kv_cache.allocate(cfg, 4, BLOCK)
    inputs = build_step([SeqChunk([5, 6, 7], 0, [2])], BLOCK, num_tokens=16, num_seqs=4)
    _, cache = jit_forward(family)(params, cfg, inputs.tokens, inputs.positions, cache, inputs.meta)
    for k, v in cache:
        used = np.zeros(k.shape[:3], bool)
        used[:, 2, :3] = True
        assert np.all(np.asarray(k)[~used] == 0) and np.all(np.asarray(v)[~used] == 0)
        assert np.all(np.abs(np.asarray(k)[used]).sum(-1) > 0)


def test_step_inputs_pack_into_one_buffer_and_back():
    """The runner sends a step's ~22 input arrays as one int32 buffer; unpacking inside jit restores every value."""
    import jax

    from rtpjax.runner.step_inputs import pack

    rng = np.random.default_rng(0)
    step = build_step([SeqChunk([5, 6, 7], 0, [2]), SeqChunk([9], 4, [1, 3])], BLOCK, num_tokens=16, num_seqs=4)
    tree = {
        "meta": step.meta, "tokens": step.tokens, "f32": rng.standard_normal((3, 5)).astype(np.float32), "u32": np.array([0, 2**32 - 1], np.uint32),
        "flags": np.array([True, False, True]), "empty": np.zeros((0, 2), np.int32), "scalar": np.int32(-7),
    }  # fmt: skip
    flat, packing = pack(tree)
    assert flat.dtype == np.int32 and flat.ndim == 1
    assert hash(packing) == hash(pack(tree)[1])  # a static jit argument: equal inputs, equal packing
    back = jax.jit(packing.unpack)(flat)
    want, got = jax.tree.leaves(tree), jax.tree.leaves(back)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for w, g in zip(want, got):
        g = np.asarray(g)
        assert g.dtype == np.asarray(w).dtype and g.shape == np.shape(w)
        assert g.tobytes() == np.asarray(w).tobytes()
    with pytest.raises(TypeError, match="4-byte dtypes"):
        pack({"x": np.zeros(3, np.int64)})


def test_build_step_matches_a_per_token_reference():
    """The vectorised packing against the plain definition, on random mixes of prefill chunks and decode tokens."""
    rng = np.random.default_rng(0)
    block = 4
    for trial in range(30):
        chunks = []
        for _ in range(int(rng.integers(1, 7))):
            start = int(rng.integers(0, 20))
            n = int(rng.choice([1, 1, 2, int(rng.integers(1, 9))]))
            table = rng.permutation(64)[: -(-(start + n) // block) + int(rng.integers(0, 2))].tolist()
            chunks.append(SeqChunk(rng.integers(0, 100, n).tolist(), start, table))
        real = sum(len(c.tokens) for c in chunks)
        got = build_step(chunks, block, num_tokens=real + 3, num_seqs=len(chunks) + 2, max_blocks=8)
        offset = 0
        assert got.meta.query_start_loc.tolist() == [*(np.cumsum([0] + [len(c.tokens) for c in chunks])[:-1]),
                                                 *[real] * 3]  # fmt: skip
        for s, c in enumerate(chunks):
            for j, token in enumerate(c.tokens):
                p = c.start + j
                assert got.tokens[offset + j] == token and got.positions[offset + j] == p
                assert got.meta.slot_mapping[offset + j] == c.block_table[p // block] * block + p % block
            assert got.meta.seq_lens[s] == c.start + len(c.tokens) and got.logits_indices[s] == offset + len(c.tokens) - 1
            assert got.meta.block_tables[s, : len(c.block_table)].tolist() == c.block_table
            offset += len(c.tokens)
        assert np.all(got.meta.slot_mapping[real:] == -1) and np.all(got.tokens[real:] == 0)
        assert np.all(got.meta.seq_lens[len(chunks):] == 0) and np.all(got.meta.block_tables[len(chunks):] == 0)
    with pytest.raises(ValueError, match="sequence 0: 9 tokens need more than its 2 blocks"):
        build_step([SeqChunk([1], 8, [0, 1])], block)
    with pytest.raises(ValueError, match="sequence 1: a step chunk needs at least one token"):
        build_step([SeqChunk([1], 0, [0]), SeqChunk([], 0, [1])], block)

"""Moving a request between engines: snapshot + detach mid-generation in one engine, adopt with its K/V in another, and
get exactly the tokens, text and stream of an uninterrupted run, without recomputing what the K/V holds."""

import dataclasses

import jax
import msgspec
import numpy as np
import pytest

from conftest import ENGINE_ARGS
from rtpjax import LLM, SamplingParams
from rtpjax.engine import detokenizer, snapshot
from rtpjax.engine.snapshot import KVBlocks, RequestSnapshot
from rtpjax.kv import kv_cache
from rtpjax.kv.block_copy import BlockCopier
from rtpjax.kv.host_blocks import KVLayout
from rtpjax.models.config import ModelConfig
from rtpjax.parallel.sharding import make_mesh
from rtpjax.runner.model_runner import CompileCounter


@dataclasses.dataclass
class Stream:
    """What a caller streaming a request's outputs has received, per completion index."""

    tokens: dict = dataclasses.field(default_factory=dict)
    text: dict = dataclasses.field(default_factory=dict)
    logprobs: dict = dataclasses.field(default_factory=dict)
    last: object = None

    def add(self, out) -> None:
        for c in out.outputs:
            self.tokens[c.index] = self.tokens.get(c.index, []) + c.delta_token_ids
            self.text[c.index] = self.text.get(c.index, "") + c.delta_text
            self.logprobs[c.index] = self.logprobs.get(c.index, []) + (c.delta_logprobs or [])
        self.last = out


def drive(engine, streams: dict, steps: int | None = None) -> None:
    """Step the engine (to the end, at most 1000 steps, or `steps` times), routing outputs into per-request streams."""
    for _ in range(1000 if steps is None else steps):
        if not engine.has_work():
            return
        for out in engine.step():
            streams.setdefault(out.request_id, Stream()).add(out)
    assert steps is not None or not engine.has_work(), "the engine still had work after 1000 steps"


def travel(snap, kv):
    """Through msgpack, as between processes; the decoded state equals what was sent."""
    got = msgspec.msgpack.decode(msgspec.msgpack.encode(snap), type=RequestSnapshot), \
        msgspec.msgpack.decode(msgspec.msgpack.encode(kv), type=KVBlocks)  # fmt: skip
    assert got == (snap, kv)
    return got


def assert_no_blocks_held(*engines):
    for e in engines:
        assert e.pool.num_free == e.pool.num_blocks and not any(e.pool.ref_count)
        assert not e.requests and not e.scheduler.running and not e.scheduler.waiting


def assert_same_stream(got: Stream, want: Stream):
    for c in want.last.outputs:
        assert got.tokens[c.index] == want.tokens[c.index] == c.token_ids
        assert got.text[c.index] == want.text[c.index] == c.text
        assert [list(e) for e in got.logprobs[c.index]] == [list(e) for e in want.logprobs[c.index]]
        np.testing.assert_allclose([v for e in got.logprobs[c.index] for v in e.values()],
                                   [v for e in want.logprobs[c.index] for v in e.values()], atol=1e-4)  # fmt: skip
        assert got.last.outputs[c.index].finish_reason == c.finish_reason
    assert got.last.finished


@pytest.fixture(scope="module")
def receiver(stories_dir, compile_cache):
    """A second engine of the same model with its own KV cache."""
    return LLM(str(stories_dir), compilation_cache_dir=compile_cache, **ENGINE_ARGS).engine


PROMPT = [int(t) for t in np.random.default_rng(4).integers(3, 512, 40)]
OTHERS = {  # requests that share engine A's steps with the one that moves
    "greedy": ([5, 6, 7], SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)),
    "seeded": ([9, 300, 41, 17], SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=30, ignore_eos=True)),
}
SAMPLED = dict(temperature=0.9, top_p=0.8, seed=11, repetition_penalty=1.3, frequency_penalty=0.5, logprobs=2,
               ignore_eos=True)  # fmt: skip
CASES = {  # name: (prompt, params, steps in engine A before the move)
    "greedy_mid_prefill": (PROMPT * 2, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), 1),
    "greedy_decode": (PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), 8),
    "seeded_penalties": (PROMPT, SamplingParams(max_tokens=30, **SAMPLED), 6),
    "seeded_n2": (PROMPT, SamplingParams(n=2, max_tokens=30, **SAMPLED), 7),
}


def run_with_others(engine, prompt, params):
    engine.add_request(prompt, params, "moving")
    for rid, (p, sp) in OTHERS.items():
        engine.add_request(p, sp, rid)


@pytest.mark.parametrize("case", list(CASES))
def test_moved_request_continues_exactly(stories_llm, receiver, case):
    source, prompt, (params, steps) = stories_llm.engine, CASES[case][0], CASES[case][1:]
    want: dict = {}
    run_with_others(source, prompt, params)
    drive(source, want)

    compiles = CompileCounter.count
    got: dict = {}
    run_with_others(source, prompt, params)
    drive(source, got, steps)
    assert not got.get("moving") or not got["moving"].last.finished
    snap, kv = travel(*source.snapshot("moving"))
    computed = [c.num_computed for c in snap.completions]
    if case == "greedy_mid_prefill":
        assert 0 < computed[0] < len(prompt) and len(snap.completions[0].token_ids) == len(prompt)
    else:  # moved mid-generation, with output already streamed
        assert all(n >= len(prompt) for n in computed) and all(c.num_sent > 0 for c in snap.completions)
    before = receiver.loop_stats.computed
    receiver.adopt(snap, kv)
    drive(receiver, got)
    drive(source, got)  # the others finish; the moved request reports nothing more there
    assert got["moving"].last is not None and set(got) == set(want)

    for rid, stream in want.items():
        assert_same_stream(got[rid], stream)
    # The receiver ran each completion from its last known token on, never what the K/V that came with it holds.
    ran = sum(len(prompt) + len(c.token_ids) - 1 - n for c, n in zip(want["moving"].last.outputs, computed))
    assert receiver.loop_stats.computed - before == ran
    assert CompileCounter.count == compiles, "moving a request compiled something"
    assert_no_blocks_held(source, receiver)


def test_refused_kv_touches_nothing_and_a_kept_request_runs_on(stories_llm, receiver):
    source, (prompt, params) = stories_llm.engine, CASES["seeded_penalties"][:2]
    want: dict = {}
    source.add_request(prompt, params, "kept")
    drive(source, want)
    got: dict = {}
    source.add_request(prompt, params, "kept")
    drive(source, got, 6)
    snap, kv = source.snapshot("kept", detach=False)
    assert kv.num_blocks == 3 and snap.completions[0].num_computed > 32  # 40 + 5 tokens read
    lay = kv.layout
    other_size = msgspec.structs.replace(kv, layout=msgspec.structs.replace(lay, block_size=32))
    other_dtype = msgspec.structs.replace(kv, layout=msgspec.structs.replace(lay, dtype="bfloat16"))
    cut = msgspec.structs.replace(kv, keys=kv.keys[:-4])
    bad_hash = msgspec.structs.replace(snap, completions=[msgspec.structs.replace(
        snap.completions[0], block_hashes=snap.completions[0].block_hashes[::-1])])  # fmt: skip
    for s, k, message in [(snap, other_size, "block_size=32 cannot enter a cache with block_size=16"),
                          (snap, other_dtype, "dtype='bfloat16' cannot enter a cache with dtype='float32'"),
                          (snap, cut, "hold .* bytes where 3 blocks"),
                          (bad_hash, kv, "block hashes do not match its tokens")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            receiver.adopt(s, k)
        assert_no_blocks_held(receiver)
    with pytest.raises(ValueError, match="no request 'gone'"):
        source.snapshot("gone")
    drive(source, got)  # the snapshot without detach left it running where it was
    assert_same_stream(got["kept"], want["kept"])
    assert_no_blocks_held(source)


def test_adopted_request_waits_for_blocks_with_its_kv_on_the_host(stories_llm, receiver):
    source, (prompt, params, steps) = stories_llm.engine, CASES["seeded_n2"]
    want: dict = {}
    source.add_request(prompt, params, "waits")
    drive(source, want)
    got: dict = {}
    source.add_request(prompt, params, "waits")
    drive(source, got, steps)
    snap, kv = source.snapshot("waits")
    held = receiver.pool.allocate(receiver.pool.num_free - 1)  # each completion needs 3 blocks
    receiver.adopt(snap, kv)
    streamed = got["waits"].last
    drive(receiver, got, 3)
    seqs = receiver.requests["waits"].seqs
    assert all(s.host_kv is not None and not s.block_table for s in seqs) and got["waits"].last is streamed
    assert receiver.pool.num_free == 1
    receiver.pool.release(held)
    drive(receiver, got, 1)
    # Admitted in one step: the second completion shares the full prompt blocks the first one loaded.
    assert seqs[0].block_table[:2] == seqs[1].block_table[:2] and seqs[0].block_table[2] != seqs[1].block_table[2]
    assert [receiver.pool.ref_count[b] for b in seqs[0].block_table[:3]] == [2, 2, 1]
    drive(receiver, got)
    assert_same_stream(got["waits"], want["waits"])
    assert_no_blocks_held(source, receiver)


def test_text_continues_across_a_character_split_by_the_move(stories_llm):
    """The move falls between the two byte tokens of "é": the receiver's text gets the whole character, once."""
    engine = stories_llm.engine
    tok = engine.tokenizer
    request = engine.make_request([1, 400, 300], SamplingParams(max_tokens=8))
    seq = request.seqs[0]
    e_acute = tok.convert_tokens_to_ids(["<0xC3>", "<0xA9>"])

    def read(s, token):  # one sampled token, detokenized as the engine does
        s.token_ids.append(token)
        detokenizer.append_tokens(tok, s.detok, s.token_ids, True)

    read(seq, 265)  # " the"
    read(seq, e_acute[0])
    assert seq.detok.text == " the" and seq.detok.read_offset < len(seq.token_ids)
    snap, blocks = snapshot.capture(request, engine.args.block_size)
    moved = snapshot.restore(snap, engine.runner.gather_blocks(blocks), engine.args.block_size, engine.info).seqs[0]
    for s in (seq, moved):
        read(s, e_acute[1])
    assert moved.detok.text == seq.detok.text == " theé"


@pytest.mark.parametrize("tensor, kv_dtype", [(1, "auto"), (2, "auto"), (8, "int8")])
def test_block_copies_keep_contents_sharding_and_other_blocks(tensor, kv_dtype):
    """8 devices for 4 KV heads: the cache holds each head twice; the host sees each once."""
    cfg = ModelConfig("LlamaForCausalLM", 64, 64, 64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                      rms_norm_eps=1e-5, rope_theta=1e4, dtype="float32")  # fmt: skip
    cache = kv_cache.allocate(cfg, 12, 4, mesh=make_mesh(tensor=tensor), kv_dtype=kv_dtype)
    copies = cache[0][0].shape[0] // cfg.num_kv_heads
    assert copies == (2 if tensor == 8 else 1)
    rng = np.random.default_rng(0)

    def fill(x):  # every head's copies equal, as the model writes them
        values = np.repeat(rng.standard_normal((cfg.num_kv_heads, *x.shape[1:])) * 50, copies, axis=0)
        return jax.device_put(values.astype(x.dtype), x.sharding)

    cache = jax.tree.map(fill, cache)
    layout = KVLayout(cache[0][0].dtype.name, 4, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    copier = BlockCopier(cache, layout, [2, 4])  # 5 blocks: a piece of the largest bucket, then a padded one
    for job in copier.jobs(cache):
        job()
    before = [np.asarray(x) for x in jax.tree.leaves(cache)]
    shardings = [x.sharding for x in jax.tree.leaves(cache)]
    src, dst = [3, 7, 1, 0, 11], [5, 6, 8, 9, 2]
    blocks = copier.gather(cache, src)
    assert blocks.num_blocks == 5 and len(blocks.arrays()) == (4 if kv_dtype == "int8" else 2)
    assert np.array_equal(blocks.arrays()[1][1], before[len(cache[0]) + 1][::copies][:, src])  # layer 1's values
    compiles = CompileCounter.count
    cache = copier.write(cache, dst, blocks, [4, 3, 2, 1, 0])  # reversed rows
    assert CompileCounter.count == compiles
    assert [x.sharding for x in jax.tree.leaves(cache)] == shardings
    for old, new in zip(before, (np.asarray(x) for x in jax.tree.leaves(cache))):
        assert np.array_equal(new[:, dst], old[:, src[::-1]])
        untouched = [b for b in range(12) if b not in dst]
        assert np.array_equal(new[:, untouched], old[:, untouched])


@pytest.mark.slow
def test_moves_through_a_tensor_parallel_engine(stories_llm, receiver, stories_dir, compile_cache):
    """A (one device) -> T (8 devices, each KV head held twice) -> B (one device), greedy with a penalty, n=2."""
    spread = LLM(str(stories_dir), compilation_cache_dir=compile_cache, tensor_parallel_size=8, **ENGINE_ARGS).engine
    assert spread.runner.cache[0][0].shape[0] == 8
    source, params = stories_llm.engine, SamplingParams(n=2, temperature=0, repetition_penalty=1.2, max_tokens=30,
                                                        ignore_eos=True)  # fmt: skip
    want: dict = {}
    source.add_request(PROMPT, params, "tp")
    drive(source, want)
    got: dict = {}
    source.add_request(PROMPT, params, "tp")
    drive(source, got, 5)
    spread.adopt(*travel(*source.snapshot("tp")))
    drive(spread, got, 6)
    receiver.adopt(*travel(*spread.snapshot("tp")))
    drive(receiver, got)
    assert_same_stream(got["tp"], want["tp"])
    assert_no_blocks_held(source, spread, receiver)

"""Train a tiny EAGLE-3 head on a target's own greedy predictions, on the CPU, and measure its acceptance.

    python -m rtpjax.spec.eagle3_train --target ../shared/models/stories260K --out /tmp/stories-eagle3

No trained head is reachable here, so this shows the proposer's real acceptance end to end: the head reads the
target's aux hidden states exactly as the engine stores them (`decoder.forward(aux_layers=...)`), learns to predict
the target's argmax two positions ahead (row p: the token at p + 1 and the target's features at p), then the engine
generates held-out prompts greedily with it and reports the mean acceptance length. Training uses teacher forcing
only (EAGLE-3's "training-time test" of chained guesses is left out), so the first draft is the best one. Plain Adam
in JAX; a full-vocabulary head (draft_vocab_size = the target's, d2t all zero).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.kv import kv_cache as kv
from rtpjax.models.decoder import forward
from rtpjax.runner.step_inputs import SeqChunk, build_step
from rtpjax.spec import eagle3_head as head_lib

TRAINED = ("fc", "input_norm", "hidden_norm", "post_attn_norm", "final_norm", "lm_head", "attn", "mlp")


def target_data(params, cfg, seqs: list[list[int]], aux_layers, block_size: int = 16):
    """Per sequence: its tokens, the target's features [n, 3H] and greedy predictions [n] at every position."""
    out = []
    for ids in seqs:
        blocks = list(range(-(-len(ids) // block_size)))
        step = build_step([SeqChunk(ids, 0, blocks)], block_size)
        cache = kv.allocate(cfg, len(blocks), block_size)
        logits, _, aux = forward(params, cfg, step.tokens, step.positions, cache, step.meta, aux_layers=aux_layers)
        out.append((np.asarray(ids), np.asarray(aux), np.asarray(jnp.argmax(logits, -1))))
    return out


def make_batch(data):
    """Rows p = 0 .. n - 3 of each sequence (all of one length): the token at p + 1, the features at p, and the
    target's choice at p + 2, stacked [B, n - 2]."""
    n = len(data[0][0]) - 2
    tokens = np.stack([ids[1 : n + 1] for ids, _, _ in data]).astype(np.int32)
    feats = np.stack([aux[:n] for _, aux, _ in data])
    labels = np.stack([best[1 : n + 1] for _, _, best in data]).astype(np.int32)
    return tokens, feats, labels


def dense_attention(p, cfg, x, positions, cache, meta):
    """Causal GQA attention over one whole sequence [n, 2H] (the paged kernels' loops are not reverse-differentiable)."""
    n = x.shape[0]
    q = head_lib.layers.linear(x, p["wq"]).reshape(n, cfg.num_heads, cfg.head_dim)
    k = head_lib.layers.linear(x, p["wk"]).reshape(n, cfg.num_kv_heads, cfg.head_dim)
    v = head_lib.layers.linear(x, p["wv"]).reshape(n, cfg.num_kv_heads, cfg.head_dim)
    inv_freq = head_lib.layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q, k = head_lib.layers.apply_rope(q, positions, inv_freq), head_lib.layers.apply_rope(k, positions, inv_freq)
    group = cfg.num_heads // cfg.num_kv_heads
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    scores = jnp.einsum("qhd,khd->hqk", q, k) * cfg.head_dim**-0.5
    scores = jnp.where(jnp.tril(jnp.ones((n, n), bool))[None], scores, -jnp.inf)
    out = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), v).reshape(n, -1)
    return head_lib.layers.linear(out, p["wo"]), cache


def train(params, cfg, data, steps: int, lr: float):
    tokens, feats, labels = make_batch(data)
    positions = jnp.arange(tokens.shape[1])
    trained = {k: params[k] for k in TRAINED}
    fixed = {k: v for k, v in params.items() if k not in TRAINED}

    def seq_loss(p, tokens, feats, labels):
        hidden, _ = head_lib.layer(p, cfg, p["embed"][tokens], head_lib.layers.linear(feats, p["fc"]), positions,
                                   None, None, attention=dense_attention)  # fmt: skip
        logits = head_lib.layers.linear(head_lib.layers.rms_norm(hidden, p["final_norm"], cfg.rms_norm_eps), p["lm_head"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    def loss(trained):
        p = {**fixed, **trained}
        return jnp.mean(jax.vmap(seq_loss, in_axes=(None, 0, 0, 0))(p, tokens, feats, labels))

    @jax.jit
    def update(trained, m, v, t):
        value, grads = jax.value_and_grad(loss)(trained)
        m = jax.tree.map(lambda a, g: 0.9 * a + 0.1 * g, m, grads)
        v = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grads)
        scale = lr * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        trained = jax.tree.map(lambda w, a, b: w - scale * a / (jnp.sqrt(b) + 1e-8), trained, m, v)
        return trained, m, v, value

    m = jax.tree.map(jnp.zeros_like, trained)
    v = jax.tree.map(jnp.zeros_like, trained)
    for t in range(1, steps + 1):
        trained, m, v, value = update(trained, m, v, t)
        if t == 1 or t % 50 == 0:
            print(f"step {t}: loss {float(value):.3f}", flush=True)
    return {**fixed, **trained}


def save(params, head_dir: Path) -> None:
    """Write trained parameters back in the published layout (the config.json is already there)."""
    from safetensors.numpy import save_file

    flat = {}
    for ours, theirs in head_lib._NAMES.items():
        node = params
        for key in ours.split("."):
            node = node[key]
        flat[theirs] = np.asarray(node, np.int64 if ours == "d2t" else np.float32)
    save_file(flat, head_dir / "model.safetensors")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-seqs", type=int, default=48)
    parser.add_argument("--length", type=int, default=96, help="tokens per training sequence")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--k", type=int, default=3, help="num_speculative_tokens when measuring")
    args = parser.parse_args(argv)
    from rtpjax import LLM, SamplingParams
    from rtpjax.loading.model_source import load_model

    began = time.monotonic()
    cfg, _, params = load_model(args.target, dtype="float32")
    out = Path(args.out)
    n = cfg.num_layers
    head_lib.write_random_head(out, cfg, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                               intermediate_size=cfg.intermediate_size * 2, draft_vocab_size=cfg.vocab_size,
                               layer_ids=(1, n // 2, n - 1))  # fmt: skip
    head = head_lib.read_config(str(out), cfg)
    head_params = head_lib.load_params(str(out), head, params["embed"], jnp.float32)
    llm = LLM(args.target, max_num_seqs=8, max_model_len=256, max_num_batched_tokens=64, block_size=16)
    rng = np.random.default_rng(0)
    starts = [[1, *rng.integers(3, cfg.vocab_size, 3).tolist()] for _ in range(args.train_seqs + 8)]
    sampled = llm.generate(starts, SamplingParams(max_tokens=args.length, temperature=0.8, seed=1, ignore_eos=True))
    seqs = [s + o.outputs[0].token_ids for s, o in zip(starts, sampled)]
    data = target_data(params, cfg, seqs[: args.train_seqs], head.aux_layers)
    trained = train(head_params, head.cfg, data, args.steps, args.lr)
    save(trained, out)
    trained_s = time.monotonic() - began
    del llm
    spec = {"method": "eagle3", "model": str(out), "num_speculative_tokens": args.k}
    llm = LLM(args.target, max_num_seqs=8, max_model_len=256, max_num_batched_tokens=64, block_size=16,
              speculative_config=spec)  # fmt: skip
    held_out = [s[:12] for s in seqs[args.train_seqs :]]
    llm.generate(held_out, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    c = llm.engine.speculator.counters
    result = dict(k=args.k, drafts=c.num_drafts, draft_tokens=c.num_draft_tokens, accepted=c.num_accepted_tokens,
                  mean_acceptance_length=1 + c.num_accepted_tokens / max(c.num_drafts, 1),
                  accepted_per_position=c.accepted_per_pos, train_s=round(trained_s, 1))  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

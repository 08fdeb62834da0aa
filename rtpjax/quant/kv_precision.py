"""Per-layer KV-cache precision (RTP-LLM's adaptive KV quantization): which layers may keep one-byte K/V.

Layers differ in how much a one-byte cache hurts (outliers in a few layers' keys dominate). A short calibration pass
measures, for each layer alone, the mean next-token KL divergence that an int8 or an fp8 cache of that layer causes
on calibration text against the model's own-dtype cache, then gives one-byte caches to the least sensitive layers
while the summed divergence stays within a budget, and checks the whole map once more. Each layer's cache is its own
buffer (`kv_cache.allocate`), so a map costs nothing at run time beyond the one-byte layers' conversions.

`--kv-cache-dtypes` takes an explicit map ("0-3:bfloat16,4-29:fp8"), `calibrate` (always the calibrated map) or
`adaptive` (the calibrated map only when KV memory is the bottleneck: the model-dtype cache that fits cannot hold
`max_num_seqs` sequences of `max_model_len` tokens, so requests would queue for blocks). A calibrated map is logged
and stored beside the compilation cache, keyed by model and budget, so the next start reads it instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.kernels.reference import ROUND_TRIPS
from rtpjax.kv import kv_cache
from rtpjax.runner.greedy import jit_forward
from rtpjax.runner.step_inputs import SeqChunk, build_step

log = logging.getLogger("rtpjax")
POLICIES = ("calibrate", "adaptive")
CANDIDATES = ("int8", "fp8")
# Calibration text: varied English prose (stories, facts, instructions), a few hundred tokens.
CALIBRATION_TEXT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter. Every morning "
    "they pushed their boat into the waves and every evening they returned with baskets of silver fish. The capital "
    "of France is Paris, the capital of Italy is Rome, and the largest ocean on Earth is the Pacific. To bake bread, "
    "mix flour, water, salt and yeast, knead the dough for ten minutes, let it rise for an hour and bake it at two "
    "hundred degrees. Water boils at one hundred degrees Celsius at sea level. The quick brown fox jumps over the lazy "
    "dog while the children laugh and run across the green field toward the river, where the ducks swim in circles."
)


def parse_map(text: str, num_layers: int) -> tuple[str, ...]:
    """'0-3:bfloat16,4-29:fp8' (or one dtype for all) -> one dtype name per layer; every layer named exactly once."""
    names: list[str | None] = [None] * num_layers
    for part in (p.strip() for p in text.split(",")):
        layers, sep, dtype = part.rpartition(":")
        if dtype not in kv_cache.KV_DTYPES:
            raise ValueError(f"--kv-cache-dtypes {text!r}: {dtype!r} is not one of {', '.join(kv_cache.KV_DTYPES)}")
        first, _, last = layers.partition("-") if sep else ("0", "-", str(num_layers - 1))
        try:
            span = range(int(first), int(last or first) + 1)
        except ValueError:
            raise ValueError(f"--kv-cache-dtypes {text!r}: {layers!r} is not a layer or a range of layers") from None
        for i in span:
            if not 0 <= i < num_layers or names[i] is not None:
                raise ValueError(f"--kv-cache-dtypes {text!r}: layer {i} is out of range or named twice "
                                 f"(the model has {num_layers})")  # fmt: skip
            names[i] = dtype
    missing = [i for i, n in enumerate(names) if n is None]
    if missing:
        raise ValueError(f"--kv-cache-dtypes {text!r}: layers {missing[:8]} have no dtype")
    return tuple(names)


def format_map(names: tuple[str, ...]) -> str:
    """The inverse of parse_map, runs of equal dtypes merged: what the log shows and the option takes back."""
    runs, start = [], 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            runs.append(f"{start}-{i - 1}:{names[start]}" if i - 1 > start else f"{start}:{names[start]}")
            start = i
    return ",".join(runs)


def log_probs(params, cfg, family, tokens: list[int], dtypes: str | tuple[str, ...], block_size: int = 16) -> jax.Array:
    """Log-probabilities at every position of one prefill of `tokens` through a cache of these per-layer dtypes."""
    return _prefill(params, cfg, family, tokens, kv_cache.allocate(cfg, _blocks(tokens, block_size), block_size,
                                                                    kv_dtype=dtypes), block_size)  # fmt: skip


def simulated_log_probs(params, cfg, family, tokens: list[int], dtypes: tuple[str, ...],
                        block_size: int = 16) -> jax.Array:  # fmt: skip
    """log_probs of a map through float32 caches holding what each layer's dtype would give back (its traced mode's
    round trip): every map is the same program, so measuring each layer alone compiles once, not once per layer and
    dtype."""
    modes = []
    for name in dtypes:
        dtype = kv_cache.KV_DTYPES.get(name)
        if name != "auto" and dtype not in ROUND_TRIPS[1:]:
            raise ValueError(f"KV precision calibration tries one-byte caches ({', '.join(CANDIDATES)}), not {name!r}")
        modes.append(0 if name == "auto" else ROUND_TRIPS.index(dtype))
    shape = kv_cache.block_shape(cfg, _blocks(tokens, block_size), block_size)
    zeros = lambda: jnp.zeros(shape, jnp.float32)  # noqa: E731  (not allocate: its makers compile on every call)
    cache = [(zeros(), zeros(), jnp.int32(mode)) for mode in modes]
    return _prefill(params, cfg, family, tokens, cache, block_size)


def _blocks(tokens: list[int], block_size: int) -> int:
    return -(-len(tokens) // block_size)


def _prefill(params, cfg, family, tokens: list[int], cache: list, block_size: int) -> jax.Array:
    inputs = build_step([SeqChunk(tokens, 0, list(range(_blocks(tokens, block_size))))], block_size)
    logits, _ = jit_forward(family)(params, cfg, inputs.tokens, inputs.positions, cache, inputs.meta, None)
    return jax.nn.log_softmax(logits[: len(tokens)].astype(jnp.float32), axis=-1)


def mean_kl(p: jax.Array, q: jax.Array) -> float:
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)))


def calibrate(params, cfg, family, tokens: list[int], budget: float, candidates=CANDIDATES) -> tuple[str, ...]:
    """The per-layer map: one-byte caches for the least sensitive layers while the summed mean next-token KL stays
    within `budget`. Each layer alone is measured through simulated caches (one program); the whole map is checked
    the same way, then through real one-byte caches, its most sensitive one-byte layer given back until it fits."""
    base = ("auto",) * cfg.num_layers
    simulated = functools.partial(simulated_log_probs, params, cfg, family, tokens)
    ref = simulated(base)
    best: dict[int, tuple[float, str]] = {}
    for i in range(cfg.num_layers):
        for dtype in candidates:
            kl = mean_kl(ref, simulated(base[:i] + (dtype,) + base[i + 1 :]))
            best[i] = min(best.get(i, (np.inf, "")), (kl, dtype))
    chosen, spent = list(base), 0.0
    for i in sorted(best, key=lambda i: best[i][0]):
        if spent + best[i][0] <= budget:
            chosen[i], spent = best[i][1], spent + best[i][0]
    _give_back_until(chosen, best, lambda layer_map: mean_kl(ref, simulated(layer_map)) <= budget)
    if any(d != "auto" for d in chosen):
        real = functools.partial(log_probs, params, cfg, family, tokens)
        real_ref = real(base)
        _give_back_until(chosen, best, lambda layer_map: mean_kl(real_ref, real(layer_map)) <= budget)
    per_layer = ", ".join(f"{i}:{best[i][1]}={best[i][0]:.2e}" for i in range(cfg.num_layers))
    log.info("KV precision calibration (mean next-token KL per layer alone, budget %g): %s", budget, per_layer)
    return tuple(chosen)


def _give_back_until(chosen: list[str], best: dict[int, tuple[float, str]], fits) -> None:
    """Give the most sensitive one-byte layer back its model dtype until the map `fits` (or none is left)."""
    while any(d != "auto" for d in chosen) and not fits(tuple(chosen)):
        worst = max((i for i, d in enumerate(chosen) if d != "auto"), key=lambda i: best[i][0])
        chosen[worst] = "auto"


def _stored(cache_dir: str | None, key: str) -> Path | None:
    return Path(cache_dir) / f"kv-precision-{key}.json" if cache_dir else None


def resolve(spec: str | None, default: str, params, cfg, family, *, budget: float, kv_bound: bool, model_id: str,
            tokenize, cache_dir: str | None = None) -> str | tuple[str, ...]:  # fmt: skip
    """The KV dtype(s) the engine allocates: `default` (--kv-cache-dtype) when no map is asked for, or when the policy
    is adaptive and KV memory is not the bottleneck (`kv_bound`); else the explicit or calibrated per-layer map."""
    if spec is None or (spec == "adaptive" and not kv_bound):
        return default
    if spec not in POLICIES:
        return parse_map(spec, cfg.num_layers)
    key = hashlib.sha256(f"{model_id}|{cfg}|{budget}|{jnp.dtype(cfg.jnp_dtype)}".encode()).hexdigest()[:16]
    stored = _stored(cache_dir, key)
    if stored is not None and stored.is_file():
        names = parse_map(json.loads(stored.read_text())["map"], cfg.num_layers)
        log.info("KV precision map (from %s): %s", stored, format_map(names))
        return names
    names = calibrate(params, cfg, family, tokenize(CALIBRATION_TEXT), budget)
    log.info("KV precision map (calibrated, budget %g mean KL): %s", budget, format_map(names))
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps({"map": format_map(names), "budget": budget, "model": model_id}))
    return names

"""Engine options: `EngineArgs` is their one definition. `LLM(**options)`, `AsyncLLM(**options)`, the flags of
`rtpjax serve` / `rtpjax generate` and the benchmarks' engine flags all derive from its fields, so a new option is
added once and a bad value fails the same way everywhere: a `ValueError` naming the option as its flag is spelled
(vLLM's spelling, `--max-num-seqs`) and the values it takes.

Every choice that shapes a compiled program (the attention kernels included) is a field here, never an environment
variable read while tracing: the step's attention metadata carries it as static configuration, so it is part of the
jit cache key, and two engines of one process (or the hosts of one engine) compile what their options say.

Imports nothing heavy: the command line builds its parser from these fields before JAX is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import numbers
import os
import typing
from pathlib import Path

# The per-step token budget when none is given, by platform. On a GPU it bounds how long a prefill chunk holds up the
# decoding streams and how soon the head of the prefill queue gets its first token; chosen by measurement on an H200
# (benchmarks/RESULTS.md, "TTFT under load": smaller budgets down to 1024 were no better, much larger ones worse).
# On a CPU a step's cost grows with its padded token count: a small budget keeps steps and compiled buckets small.
TOKEN_BUDGET = {"gpu": 2048}
CPU_TOKEN_BUDGET = 256

# Where the command lines keep JAX's persistent compilation cache unless told otherwise ('' turns it off); the Python
# API has no default (None: off).
CLI_COMPILATION_CACHE = str(Path.home() / ".cache" / "rtpjax" / "xla")


# rtpjax.loading.quantization.METHODS (named here without importing JAX; a test keeps the two equal).
QUANTIZATION_METHODS = ("fp8", "int8", "fp8-weight-only", "int8-weight-only", "int4", "int4-asym")


def option(default, text: str, *, choices: tuple | None = None, minimum: float | None = None,
           above: float | None = None, maximum: float | None = None, path: bool = False, cli: bool = True):  # fmt: skip
    """A field of EngineArgs with what its flag and its validation need. minimum / maximum are inclusive, above is
    exclusive; path: a str field that also takes an os.PathLike; cli=False: no command-line flag."""
    meta = dict(help=text, choices=choices, minimum=minimum, above=above, maximum=maximum, path=path, cli=cli)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(kw_only=True)
class EngineArgs:
    """The engine's options (vLLM's names). Checked on construction: bad values raise ValueError."""

    max_model_len: int | None = option(None, "longest prompt plus output, in tokens (default: the model's "
                                       "max_position_embeddings)", minimum=1)  # fmt: skip
    block_size: int = option(16, "tokens per KV cache block", minimum=1)
    max_num_seqs: int = option(256, "sequences in one step at most", minimum=1)
    max_num_batched_tokens: int | None = option(None, "tokens in one step at most (prompt chunks and decode rows); "
                                                "default: 2048 on a GPU, 256 on a CPU", minimum=1)  # fmt: skip
    num_gpu_blocks: int | None = option(None, "KV cache blocks (instead of sizing the cache by "
                                        "--gpu-memory-utilization)", minimum=1)  # fmt: skip
    gpu_memory_utilization: float = option(0.9, "fraction of device memory the weights and KV cache may fill",
                                           above=0, maximum=1)  # fmt: skip
    cpu_kv_cache_bytes: int = option(1 << 30, "KV cache bytes on hosts without device memory statistics (CPU)",
                                     minimum=1)  # fmt: skip
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of prompt prefixes already computed")
    dtype: str | None = option(None, "dtype of weights and activations (default: the checkpoint's)",
                               choices=("float32", "bfloat16", "float16"))  # fmt: skip
    tensor_parallel_size: int = option(1, "devices the attention heads and MLP split over", minimum=1)
    attention_impl: str = option("auto", "attention implementation: auto = the Pallas kernels on GPU, the plain-jnp "
                                 "reference elsewhere", choices=("auto", "pallas", "reference"))  # fmt: skip
    kv_write: str = option("auto", "how the Pallas path writes a step's K/V into the cache: auto = the Pallas kernel "
                           "for steps of >= 128 tokens and XLA's scatter below, or one of them for every step",
                           choices=("auto", "pallas", "xla"))  # fmt: skip
    mosaic_prefill: bool = option(False, "on Hopper GPUs, send long prefill chunks to the Mosaic GPU kernel (pays "
                                  "from ~4,500 cached tokens, a few percent slower below; elsewhere no "
                                  "effect)")  # fmt: skip
    kv_cache_dtype: str = option("auto", "KV cache dtype: auto = the model's; int8 / fp8 (e4m3) keep a scale per "
                                 "token and head",
                                 choices=("auto", "bfloat16", "float16", "float32", "int8", "fp8"))  # fmt: skip
    kv_cache_dtypes: str | None = option(None, "per-layer KV cache dtypes: a map such as '0-3:bfloat16,4-29:fp8', "
                                         "'calibrate' (int8 / fp8 for the layers a short calibration pass finds "
                                         "least sensitive, within --kv-calibration-budget) or 'adaptive' (the "
                                         "calibrated map only when the model-dtype cache cannot hold max-num-seqs "
                                         "full-length sequences)")  # fmt: skip
    kv_calibration_budget: float = option(0.02, "the calibrated KV map's error budget: mean next-token KL divergence "
                                          "against the model-dtype cache on the calibration text", above=0)  # fmt: skip
    compilation_cache_dir: str | None = option(None, "JAX's persistent compilation cache: a second start skips "
                                               "compiling ('' or none: off)", path=True)  # fmt: skip
    seed: int = option(0, "draws the seeds of requests that bring none")
    tokenizer: str | None = option(None, "tokenizer folder (default: the model's)", path=True)
    skip_tokenizer_init: bool = option(False, "run without a tokenizer: prompts as token ids, outputs with token ids "
                                       "and empty text")  # fmt: skip
    load_format: str = option("auto", "dummy: random weights made on the devices from config.json (benchmarks)",
                              choices=("auto", "dummy"))  # fmt: skip
    quantization: str | None = option(None, "quantize the linear weights on the devices at load: fp8 / int8 = W8A8 "
                                      "(per-channel weights, activations per token, the matmul in fp8 / int8), "
                                      "*-weight-only = 1-byte weights with activations kept, int4 = weight-only "
                                      "groups of 128 (-asym: with zero points); a pre-quantized checkpoint "
                                      "(compressed-tensors, GPTQ, AWQ) loads as it is without this",
                                      choices=QUANTIZATION_METHODS)  # fmt: skip
    progress: bool = option(False, "progress bars for loading and compiling", cli=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name)))

    def for_platform(self, platform: str) -> EngineArgs:
        """These options with the defaults that depend on the device filled in (platform: jax.default_backend())."""
        if self.max_num_batched_tokens is not None:
            return self
        return dataclasses.replace(self, max_num_batched_tokens=TOKEN_BUDGET.get(platform, CPU_TOKEN_BUDGET))

    @classmethod
    def from_kwargs(cls, **options) -> EngineArgs:
        """EngineArgs(**options), with an unknown name reported as such, with the nearest option's name."""
        names = [f.name for f in dataclasses.fields(cls)]
        for name in options:
            if name not in names:
                near = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; options: {', '.join(names)}"
                raise TypeError(f"unknown engine option {name!r}{hint}")
        return cls(**options)


def flag(name: str) -> str:
    """An option's command-line spelling: max_num_seqs -> --max-num-seqs."""
    return "--" + name.replace("_", "-")


@functools.cache
def _kinds() -> dict[str, tuple[type, bool]]:
    """Per field: (int / float / bool / str, whether None is allowed), from the annotations."""
    kinds = {}
    for name, hint in typing.get_type_hints(EngineArgs).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kinds[name] = (args[0], True) if args else (hint, False)
    return kinds


def _kind(f: dataclasses.Field) -> tuple[type, bool]:
    return _kinds()[f.name]


def describe(f: dataclasses.Field) -> str:
    """What an option takes, as its error says it: "an integer >= 1", "auto, pallas or xla"..."""
    kind, optional = _kind(f)
    m = f.metadata
    if m["choices"] or kind is bool:
        words = [*(m["choices"] or ("True", "False")), *(("None",) if optional else ())]
        return ", ".join(words[:-1]) + " or " + words[-1]
    text = {int: "an integer", float: "a number", str: "a string"}[kind]
    if m["above"] is not None and m["maximum"] is not None:
        text += f" in ({m['above']:g}, {m['maximum']:g}]"
    elif m["minimum"] is not None:
        text += f" >= {m['minimum']:g}"
    return text + (" or None" if optional else "")


def _checked(f: dataclasses.Field, value):
    kind, optional = _kind(f)
    m = f.metadata
    if value is None and optional:
        return None
    if m["path"] and isinstance(value, os.PathLike):
        value = os.fspath(value)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
          float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[kind](value)  # fmt: skip
    ok = ok and (not m["choices"] or value in m["choices"])
    ok = ok and (m["minimum"] is None or value >= m["minimum"]) and (m["above"] is None or value > m["above"])
    ok = ok and (m["maximum"] is None or value <= m["maximum"])
    if not ok:
        name = flag(f.name) if m["cli"] else f.name
        raise ValueError(f"{name} must be {describe(f)}, got {value!r}")
    return int(value) if kind is int else value


def cli_fields(exclude=()) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineArgs) if f.metadata["cli"] and f.name not in exclude]


def add_engine_arguments(parser: argparse.ArgumentParser, *, exclude=(), **defaults) -> None:
    """One flag per EngineArgs field (`--max-num-seqs`; a bool as `--enable-prefix-caching` /
    `--no-enable-prefix-caching`), in an "engine options" group. `defaults` replace the fields' own defaults for this
    command; `exclude` names options the command sets itself (no flag for them)."""
    unknown = set(defaults) - {f.name for f in cli_fields(exclude)}
    if unknown:
        raise TypeError(f"defaults for options without a flag here: {sorted(unknown)}")
    group = parser.add_argument_group("engine options (EngineArgs)")
    for f in cli_fields(exclude):
        kind, _ = _kind(f)
        default = defaults.get(f.name, f.default)
        shown = "" if default is None else f" (default: {default!r})" if default == "" else f" (default: {default})"
        text = f.metadata["help"].replace("%", "%%") + shown
        if kind is bool:
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=text)  # fmt: skip
        else:
            group.add_argument(flag(f.name), dest=f.name, type=kind, choices=f.metadata["choices"], default=default,
                               help=text)  # fmt: skip


def engine_args_from(namespace: argparse.Namespace, **overrides) -> EngineArgs:
    """EngineArgs from the flags `add_engine_arguments` added (those present in `namespace`), then `overrides`."""
    given = {f.name: getattr(namespace, f.name) for f in cli_fields() if hasattr(namespace, f.name)}
    return EngineArgs.from_kwargs(**{**given, **overrides})

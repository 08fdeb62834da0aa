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
# Sequences in one step when none is given. On a CPU each sequence bucket is one model and six sampler executables to
# compile at warm-up, and a few cores gain little from wider steps; the KV cache and the rest of the CPU sizes come
# from the memory plan (rtpjax/memory_plan.py).
MAX_NUM_SEQS = {"gpu": 256}
CPU_MAX_NUM_SEQS = 16

# Where the command lines keep JAX's persistent compilation cache unless told otherwise ('' turns it off); the Python
# API has no default (None: off).
CLI_COMPILATION_CACHE = str(Path.home() / ".cache" / "rtpjax" / "xla")


# rtpjax.loading.quantization.METHODS (named here without importing JAX; a test keeps the two equal).
QUANTIZATION_METHODS = ("fp8", "int8", "fp8-weight-only", "int8-weight-only", "int4", "int4-asym")


def option(default, text: str, *, choices: tuple | None = None, minimum: float | None = None,
           above: float | None = None, maximum: float | None = None, path: bool = False, cli: bool = True,
           parse=None):  # fmt: skip
    """A field of EngineArgs with what its flag and its validation need. minimum / maximum are inclusive, above is
    exclusive; path: a str field that also takes an os.PathLike; cli=False: no command-line flag; parse: for a dict
    field, what turns the dict or its JSON text (the flag's value) into the stored dict, raising ValueError."""
    meta = dict(help=text, choices=choices, minimum=minimum, above=above, maximum=maximum, path=path, cli=cli,
                parse=parse)  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


def _speculative(value) -> dict:
    from rtpjax.spec.config import SpeculativeConfig  # pure Python, no JAX

    return dataclasses.asdict(SpeculativeConfig.parse(value))


@dataclasses.dataclass(kw_only=True)
class EngineArgs:
    """The engine's options (vLLM's names). Checked on construction: bad values raise ValueError."""

    max_model_len: int | None = option(None, "longest prompt plus output, in tokens (default: the model's "
                                       "max_position_embeddings, or less where memory is short)", minimum=1)  # fmt: skip
    block_size: int = option(16, "tokens per KV cache block", minimum=1)
    max_num_seqs: int | None = option(None, "sequences in one step at most (default: 256 on a GPU, 16 on a CPU)",
                                      minimum=1)  # fmt: skip
    max_num_batched_tokens: int | None = option(None, "tokens in one step at most (prompt chunks and decode rows); "
                                                "default: 2048 on a GPU, 256 on a CPU", minimum=1)  # fmt: skip
    scheduling_policy: str = option("lpm", "order of admission within a priority: lpm = longest prefix in the KV "
                                    "cache first, then arrival (SGLang's; more sequences fit a pool they share "
                                    "prefixes of), fcfs = arrival", choices=("lpm", "fcfs"))  # fmt: skip
    decode_headroom: float = option(0.0, "share of each running sequence's remaining max_tokens that admission keeps "
                                    "KV blocks free for, beside the prompts (a sequence is admitted beside others "
                                    "only with room for all of its prompt), so that growing sequences are not "
                                    "preempted (0: output not counted; 1: all of max_tokens)", minimum=0,
                                    maximum=1)  # fmt: skip
    num_gpu_blocks: int | None = option(None, "KV cache blocks (instead of sizing the cache by "
                                        "--gpu-memory-utilization)", minimum=1)  # fmt: skip
    gpu_memory_utilization: float = option(0.9, "fraction of device memory the weights and KV cache may fill",
                                           above=0, maximum=1)  # fmt: skip
    cpu_kv_cache_bytes: int | None = option(None, "KV cache bytes on hosts without device memory statistics (CPU; "
                                            "default: sized from the memory this process may take)",
                                            minimum=1)  # fmt: skip
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of prompt prefixes already computed")
    dtype: str | None = option(None, "dtype of weights and activations (default: the checkpoint's)",
                               choices=("float32", "bfloat16", "float16"))  # fmt: skip
    tensor_parallel_size: int = option(1, "devices the attention heads and MLP split over", minimum=1)
    expert_parallel_size: int = option(1, "devices a MoE model's experts split over (the mesh's expert axis; "
                                       "attention is replicated over it)", minimum=1)  # fmt: skip
    pipeline_parallel_size: int = option(1, "pipeline stages the layers split into, each on tensor x expert devices "
                                         "of its own (steps run as two micro-batches where they split)", minimum=1)  # fmt: skip
    moe_impl: str = option("auto", "how MoE experts run: grouped = only the routed tokens, sorted by expert (FLOPs "
                           "scale with top-k); pallas = the same through a grouped-matmul kernel reading expert "
                           "weights in place; dense = every expert on every token; auto = pallas on GPU where it "
                           "runs, else per step shape the cheaper by a bandwidth/compute model",
                           choices=("auto", "grouped", "dense", "pallas"))  # fmt: skip
    expert_placement: str | None = option(None, "JSON file {layer: [physical slot of logical expert 0, 1, ...]}: "
                                          "experts reordered at load (an EPLB-style static rebalancing)",
                                          path=True)  # fmt: skip
    attention_impl: str = option("auto", "attention implementation: auto = the Pallas kernels on GPU, the plain-jnp "
                                 "reference elsewhere", choices=("auto", "pallas", "reference"))  # fmt: skip
    kv_write: str = option("auto", "how the Pallas path writes a step's K/V into the cache: auto = the Pallas kernel "
                           "for steps of >= 128 tokens and XLA's scatter below, or one of them for every step",
                           choices=("auto", "pallas", "xla"))  # fmt: skip
    one_row_decode: bool | None = option(None, "on GPUs, run a lone sequence's decode step as one token, not padded "
                                         "to the 16 rows of the smallest step (one more compiled step); default: on "
                                         "where it applies and pays (a GPU, no --pipeline-parallel-size, unquantized "
                                         "weights)")  # fmt: skip
    num_scheduler_steps: int = option(1, "multi-step decode (vLLM's spelling): decode steps run this many "
                                      "iterations per launch, each sampling the next token on the device, so the "
                                      "host's work per step is paid once per this many tokens; not while a "
                                      "waiting request could be admitted or one asks for logprobs (one more "
                                      "compiled program per decode step shape, 2 sampler variants)",
                                      minimum=1)  # fmt: skip
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
    quantize_lm_head: bool = option(False, "also quantize the output head by --quantization's method (a model that "
                                    "ties it to the embedding gets a quantized copy): at batch 1 the head is a "
                                    "large share of the bytes a quantized model reads per token; quality in "
                                    "benchmarks/RESULTS.md; a pre-quantized checkpoint's head loads as "
                                    "written")  # fmt: skip
    quantized_decode: str = option("auto", "how decode-sized steps (<= 64 tokens) multiply by quantized weights on a "
                                   "GPU: pallas = the small-M kernel streaming the stored weights; xla = XLA's dot "
                                   "with the weight converted inside it (one-byte weights at one row: its row "
                                   "reduction; activations unquantized; int4 dequantized first); auto = pallas for "
                                   "int4, xla for the rest",
                                   choices=("auto", "pallas", "xla"))  # fmt: skip
    kv_offloading_size: float | None = option(None, "GiB of host memory (page-locked on GPUs) for a KV tier below the "
                                              "device: evicted prefix blocks go there and come back on a hit",
                                              above=0)  # fmt: skip
    kv_disk_path: str | None = option(None, "folder of a disk KV tier below the host tier (needs "
                                      "--kv-offloading-size); it outlives restarts with the same model, dtype, "
                                      "block size and tokenizer", path=True)  # fmt: skip
    kv_disk_size: float | None = option(None, "GiB the disk KV tier may fill (needed with --kv-disk-path)", above=0)
    preemption_mode: str = option("auto", "how a preempted sequence gets its KV back, and whether KV tier hits are "
                                  "loaded: swap = its blocks go down to the host tier and are loaded back (tier "
                                  "hits always loaded); recompute = its tokens run again; auto = swap, loading a "
                                  "tier hit only when the measured load time is below the measured recompute time",
                                  choices=("auto", "swap", "recompute"))  # fmt: skip
    warmup: bool = option(True, "compile every step shape at start, so serving never compiles mid-run (no: each "
                          "shape compiles, or loads from the compilation cache, at its first use; for one-off runs, "
                          "the default of `rtpjax generate`)")  # fmt: skip
    progress: bool = option(True, "progress bars for loading and compiling where stderr is a terminal (False, or "
                            "output that is no terminal: log lines instead)", cli=False)  # fmt: skip
    enable_kv_cache_events: bool = option(True, "note each change to the prefix cache (vLLM's KV events: blocks "
                                          "stored / removed by hash) for routers: GET /kv_events and, with "
                                          "--kv-events-endpoint, a ZMQ stream")  # fmt: skip
    kv_events_endpoint: str | None = option(None, "ZMQ PUB address the KV events go out on, as vLLM's "
                                            "--kv-events-config endpoint (e.g. tcp://*:5557; none: HTTP only)")  # fmt: skip
    kv_events_replay_endpoint: str | None = option(None, "ZMQ ROUTER address that replays buffered KV event "
                                                   "batches from a sequence number (vLLM's replay_endpoint)")  # fmt: skip
    speculative_config: dict | None = option(None, "speculative decoding as vLLM spells it, a JSON object: "
                                             '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
                                             '"prompt_lookup_min": 2} (README: speculative decoding)',
                                             parse=_speculative)  # fmt: skip
    role: str = option("both", "prefill/decode disaggregation: prefill = compute prompts and hand their K/V to a "
                       "decode engine (requests with kv_transfer_params.do_remote_decode), decode = continue requests "
                       "whose K/V a prefill engine computed (do_remote_prefill), both = either and plain requests",
                       choices=("both", "prefill", "decode"))  # fmt: skip
    kv_transfer_host: str = option("127.0.0.1", "address a prefill engine serves its K/V hand-offs on (and "
                                   "advertises to decode engines)")  # fmt: skip
    kv_transfer_port: int = option(0, "port of the K/V hand-off server (0: any free port)", minimum=0, maximum=65535)
    kv_transfer_timeout: float = option(30.0, "seconds a prefill engine holds a hand-off's K/V for its decode engine; "
                                        "a decode engine waits as long for room in its cache (then refuses the "
                                        "request) and for the K/V (then recomputes the prompt)", above=0)  # fmt: skip
    num_processes: int = option(1, "processes (hosts) one engine spans, through jax.distributed: the mesh covers "
                                "every process's devices; process 0 schedules and serves, the others follow its "
                                "steps", minimum=1)  # fmt: skip
    process_id: int = option(0, "this process's rank among --num-processes (0: the leader)", minimum=0)
    coordinator_address: str | None = option(None, "HOST:PORT of process 0 for jax.distributed (--num-processes > 1); "
                                             "the leader's step channel listens on PORT + 1")  # fmt: skip

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        if self.quantize_lm_head and self.quantization is None:
            raise ValueError("--quantize-lm-head quantizes the head by --quantization's method: give --quantization")
        if (self.kv_disk_path is None) != (self.kv_disk_size is None):
            raise ValueError("--kv-disk-path and --kv-disk-size go together: give both or neither")
        if self.num_processes > 1 and self.speculative_config is not None:
            raise ValueError("--speculative-config does not work with --num-processes > 1 yet (followers replay plain "
                             "steps only)")  # fmt: skip
        if self.num_scheduler_steps > 1 and (self.speculative_config is not None or self.pipeline_parallel_size > 1):
            raise ValueError("--num-scheduler-steps > 1 does not work with --speculative-config or "
                             "--pipeline-parallel-size > 1 (they run steps of their own)")  # fmt: skip
        if self.num_processes > 1 and self.pipeline_parallel_size > 1:
            raise ValueError("--pipeline-parallel-size does not work with --num-processes > 1 yet (stages run as "
                             "programs of one process)")  # fmt: skip
        self._check_processes()

    def _check_processes(self) -> None:
        if self.process_id >= self.num_processes:
            raise ValueError(f"--process-id must be below --num-processes ({self.num_processes}), got {self.process_id}")
        if self.num_processes == 1:
            return
        host, _, port = (self.coordinator_address or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65535:
            raise ValueError(f"--coordinator-address must be HOST:PORT with --num-processes {self.num_processes}, "
                             f"got {self.coordinator_address!r}")  # fmt: skip
        if self.kv_offloading_size or self.kv_disk_path:
            raise ValueError("KV tiers (--kv-offloading-size, --kv-disk-path) work in one process only, not with "
                             f"--num-processes {self.num_processes}")  # fmt: skip

    def for_platform(self, platform: str) -> EngineArgs:
        """These options with the defaults that depend on the device filled in (platform: jax.default_backend())."""
        budget = self.max_num_batched_tokens or TOKEN_BUDGET.get(platform, CPU_TOKEN_BUDGET)
        seqs = self.max_num_seqs or MAX_NUM_SEQS.get(platform, CPU_MAX_NUM_SEQS)
        return dataclasses.replace(self, max_num_batched_tokens=budget, max_num_seqs=seqs)

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
    text = {int: "an integer", float: "a number", str: "a string", dict: "a JSON object"}[kind]
    if m["above"] is not None and m["maximum"] is not None:
        text += f" in ({m['above']:g}, {m['maximum']:g}]"
    elif m["minimum"] is not None and m["maximum"] is not None:
        text += f" in [{m['minimum']:g}, {m['maximum']:g}]"
    elif m["minimum"] is not None:
        text += f" >= {m['minimum']:g}"
    elif m["above"] is not None:
        text += f" > {m['above']:g}"
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
          str: lambda v: isinstance(v, str),
          dict: lambda v: isinstance(v, (dict, str))}[kind](value)  # fmt: skip
    ok = ok and (not m["choices"] or value in m["choices"])
    ok = ok and (m["minimum"] is None or value >= m["minimum"]) and (m["above"] is None or value > m["above"])
    ok = ok and (m["maximum"] is None or value <= m["maximum"])
    if not ok:
        name = flag(f.name) if m["cli"] else f.name
        raise ValueError(f"{name} must be {describe(f)}, got {value!r}")
    if m["parse"] is not None:
        return m["parse"](value)
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
            group.add_argument(flag(f.name), dest=f.name, type=str if kind is dict else kind,
                               choices=f.metadata["choices"], default=default, help=text)  # fmt: skip


def engine_args_from(namespace: argparse.Namespace, **overrides) -> EngineArgs:
    """EngineArgs from the flags `add_engine_arguments` added (those present in `namespace`), then `overrides`."""
    given = {f.name: getattr(namespace, f.name) for f in cli_fields() if hasattr(namespace, f.name)}
    return EngineArgs.from_kwargs(**{**given, **overrides})

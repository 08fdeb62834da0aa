"""Shared fixtures: 8 host CPU devices for the mesh tests, tiny random Hugging Face checkpoints of every family."""

import os

# Before jax is imported anywhere: the sharding tests need a mesh of 8 CPU devices.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Converted GGUF models and the fetched default model are cached here across test runs, not in the user's home.
os.environ.setdefault("RTPJAX_CACHE", os.path.join(__import__("tempfile").gettempdir(), "rtpjax-test-cache"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = SHARED_MODELS / "stories260K"

_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip

# name -> (transformers config class, model class, extra config). Each exercises what its family adds.
TINY = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64), rope_theta=500000.0, head_dim=16)),
    # head_dim 16, theta 5e5, original 64: wavelengths fall in the high, medium (smoothed) and low bands.
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=8)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[1])),
}  # fmt: skip


def make_tiny_checkpoint(name: str, out: Path, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers

    config_cls, model_cls, extra = TINY[name]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_checkpoint(name, root / name) for name in TINY}


@pytest.fixture(scope="session")
def stories_dir():
    if not STORIES.is_dir():
        pytest.skip("../shared/models/stories260K is absent")
    return STORIES


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for the session: engines with equal shapes compile once."""
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
    """After each test file: drop JAX's cached executables and collect what the file's engines left behind.

    XLA:CPU maps a few memory regions per loaded executable; one process running the whole suite otherwise keeps
    every executable it ever compiled and runs into the kernel's limit on mappings (vm.max_map_count, 65530 by
    default), after which a compilation fails with a segmentation fault or an abort."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture
def triton_verified(monkeypatch):
    """The results of MLIR's verifier on every Triton module Pallas builds while the test lowers for CUDA (one entry
    per kernel; an invalid module raises MLIRError): the GPU's Triton parser rejects what the lowering alone lets
    through (a loop bound of the wrong integer type failed only there)."""
    from jax._src.pallas.triton import lowering

    build, verified = lowering.lower_jaxpr_to_triton_module, []

    def build_and_verify(*args, **kwargs):
        result = build(*args, **kwargs)
        with result.module.context:
            verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", build_and_verify)
    return verified


# Small limits keep the number of compiled bucket shapes (and so the suite's time) low.
ENGINE_ARGS = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256, block_size=16)


@pytest.fixture(scope="session")
def stories_llm(stories_dir, compile_cache):
    from rtpjax import LLM

    return LLM(str(stories_dir), compilation_cache_dir=compile_cache, **ENGINE_ARGS)


def run_out(engine, step=None, max_steps: int = 1000) -> list:
    """Steps `engine` until it has no work (`step`: what runs one step, engine.step by default); every step's outputs,
    in order. Fails, rather than spins, when work is left after `max_steps` (a scheduling bug)."""
    step = step or engine.step
    outs = []
    for _ in range(max_steps):
        if not engine.has_work():
            return outs
        outs += step() or []
    raise AssertionError(f"the engine still had work after {max_steps} steps")


def wait_healthy(proc, url: str, what: str, seconds: float = 300.0) -> None:
    """Poll `url`/health until it answers 200; fail with the process's output if it exits, or after `seconds`."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            out = proc.stdout or proc.stderr
            raise AssertionError(f"{what} exited: " + (out.read()[-3000:] if out is not None else ""))
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.3)

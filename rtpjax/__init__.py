"""rtpjax: LLM inference on JAX/XLA. Models are pure functions over parameter pytrees and a paged KV cache."""

__version__ = "0.1.0"

_API = {
    "LLM": "rtpjax.llm", "AsyncLLM": "rtpjax.llm", "LLMEngine": "rtpjax.engine.core", "EngineArgs": "rtpjax.options",
    "RequestOutput": "rtpjax.engine.core", "CompletionOutput": "rtpjax.engine.core", "SamplingParams": "rtpjax.sampling_params",
}  # fmt: skip
__all__ = sorted(_API)


def __getattr__(name: str):
    """Import the API on first use, so `import rtpjax.kernels.attention` (kernels, benchmarks) stays light."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'rtpjax' has no attribute {name!r}")

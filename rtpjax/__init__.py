"""rtpjax: LLM inference on JAX/XLA. Models are pure functions over parameter pytrees and a paged KV cache."""

__version__ = "0.1.0"

from rtpjax.engine import CompletionOutput, EngineArgs, LLMEngine, RequestOutput  # noqa: E402
from rtpjax.llm import LLM, AsyncLLM  # noqa: E402
from rtpjax.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "AsyncLLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput"]

"""rtpjax: LLM inference on JAX/XLA. Models are pure functions over parameter pytrees and a paged KV cache."""

__version__ = "0.1.0"

"""What a request asks of sampling and stopping, checked once when the request arrives."""

from __future__ import annotations

import dataclasses

MAX_LOGPROBS = 20  # top alternatives computed on device every step; requests may ask for up to this many
MAX_STOP_TOKEN_IDS = 8  # stop/EOS ids suppressed on device while min_tokens is not reached


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling, with vLLM's names and defaults. temperature=0 is greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top alternatives per generated token (0: only the sampled token's)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    speculative: bool = True  # False: this request is never given drafts (the engine's speculative_config)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        need(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or positive, got {self.top_k!r}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        need(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
        )
        need(isinstance(self.min_tokens, int) and self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        need(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(
                value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                f"{name} must be between 0 and {MAX_LOGPROBS}, got {value!r}",
            )
        need(all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings")
        need(isinstance(self.speculative, bool), f"speculative must be true or false, got {self.speculative!r}")
        need(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS - 1,
            f"at most {MAX_STOP_TOKEN_IDS - 1} stop_token_ids are supported, got {len(self.stop_token_ids)}",
        )

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

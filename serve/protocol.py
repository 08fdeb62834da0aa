"""OpenAI request schemas (pydantic), their errors, and their translation into SamplingParams.

The models describe the API in /openapi.json too. Unknown fields are ignored as OpenAI's API ignores them, except the
ones we know and do not support, which are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rtpjax.sampling_params import MAX_LOGPROBS, SamplingParams


class APIError(Exception):
    """An error with its HTTP status and OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    speculative: bool = True  # rtpjax extension: false opts this request out of speculative decoding
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: int = 0


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


# Parameters of OpenAI's API that this server refuses rather than silently ignores.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias", "best_of",
               "suffix", "audio", "modalities", "prediction", "parallel_tool_calls")  # fmt: skip


def check_unsupported(request: _Sampling) -> None:
    for name in UNSUPPORTED:
        value = (request.model_extra or {}).get(name)
        if value not in (None, [], {}):
            raise APIError(400, f"parameter {name!r} is not supported by this server", param=name,
                           code="unsupported_parameter")  # fmt: skip


def sampling_params(request: _Sampling, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """OpenAI defaults: temperature 1, top_p 1; max_tokens None means up to the model's context."""
    check_unsupported(request)
    try:
        return SamplingParams(
            n=request.n, temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p, top_k=request.top_k or 0,
            min_p=request.min_p or 0.0, seed=request.seed, stop=request.stop, stop_token_ids=request.stop_token_ids,
            max_tokens=max_tokens, min_tokens=request.min_tokens, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
            ignore_eos=request.ignore_eos, logprobs=logprobs, speculative=request.speculative,
        )  # fmt: skip
    except ValueError as e:
        raise APIError(400, str(e)) from None


def message_text(message: ChatMessage) -> str:
    """Plain text of a message; content parts of type "text" are joined, other parts are refused."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        texts.append(part["text"])
    return "".join(texts)


def chat_token_ids(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool, model_name: str,
                   encode=None) -> list[int]:  # fmt: skip
    """A conversation's prompt token ids through the tokenizer's chat template: what the server runs, and what a
    router hashes to find the replica holding its prefix. `encode`: the tokenizer's encode, or one that gives the
    same ids (loading.tokenizer.fast_encoder)."""
    if not tokenizer.chat_template:
        raise APIError(400, f"the model {model_name!r} has no chat template; use /v1/completions", param="messages")
    plain = [{"role": m.role, "content": message_text(m)} for m in messages]
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template that rejects this conversation (roles out of order, ...)
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    return (encode or tokenizer.encode)(text, add_special_tokens=False)

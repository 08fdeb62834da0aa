"""A request from prompt to outputs: validation (RequestMaker, into the wire's AddRequest), the engine's record of it,
and what callers get back."""

from __future__ import annotations

import dataclasses
import itertools
import random
import time

import numpy as np

from rtpjax.distributed.messages import AddRequest, ModelInfo, to_monotonic
from rtpjax.engine import detokenizer
from rtpjax.engine.sequence import RequestMetrics, Sequence
from rtpjax.sampling_params import SamplingParams

@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None
    delta_text: str = ""  # what this output adds to the previous one of the same request
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)
    delta_logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: object = None  # the first sequence's RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None  # None for the first prompt token
    kv_transfer_params: dict | None = None  # prefill role: where a decode engine pulls this request's K/V
    trace: dict[str, float] | None = None  # a hand-off's phases (messages.RequestDelta.trace), so far


@dataclasses.dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    sent: list[int] = dataclasses.field(default_factory=list)  # per seq: tokens already reported
    reported: bool = False  # whether an output (and the prompt logprobs with it) went out
    prompt_logprobs: list | None = None
    trace: dict[str, float] = dataclasses.field(default_factory=dict)  # hand-off phases not yet reported

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class RequestMaker:
    """Prompt + SamplingParams -> a validated AddRequest (`message`: where the request is submitted, so the tokenizer
    runs there and bad input fails there) -> the engine's Request (`build`: from the message alone, no tokenizer).
    The engine and AsyncLLM's front end each hold one."""

    def __init__(self, tokenizer, info: ModelInfo, seed: int):
        self.tokenizer, self.info = tokenizer, info
        self._ids = itertools.count()
        self._rng = random.Random(seed)  # draws the seeds of requests that bring none

    def __call__(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
                 priority: int = 0) -> Request:  # fmt: skip
        return self.build(self.message(prompt, params, request_id, priority))

    def message(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
                priority: int = 0) -> AddRequest:  # fmt: skip
        """Tokenize, validate, and resolve what the engine must not choose itself (id, seed, arrival); raises
        ValueError for bad input."""
        params = params or SamplingParams()
        params.validate()
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            what = "a text prompt needs" if isinstance(prompt, str) else "stop strings need"
            raise ValueError(f"{what} a tokenizer, and this engine runs without one (skip_tokenizer_init): send token "
                             "ids (and stop_token_ids)")  # fmt: skip
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            if not all(isinstance(t, (int, np.integer)) for t in ids):
                raise ValueError("prompt token ids must be integers")
            ids = [int(t) for t in ids]
        request_id = request_id if request_id is not None else str(next(self._ids))
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        message = AddRequest(request_id, ids, params, seed % (1 << 32), time.time(), text, priority)
        self.check(message)
        return message

    def check(self, message: AddRequest) -> int:
        """Raises ValueError where the request does not fit the model; returns its max_tokens."""
        info, ids, params = self.info, message.prompt_ids, message.params
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= info.vocab_size:
            bad = next(t for t in ids if not 0 <= t < info.vocab_size)
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {info.vocab_size})")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < info.vocab_size]
        if bad_stop:
            raise ValueError(f"stop token id {bad_stop[0]} is outside the vocabulary [0, {info.vocab_size})")
        if not -(2**31) <= message.priority < 2**31:
            raise ValueError(f"priority must fit in 32 bits, got {message.priority}")
        if len(ids) >= info.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {info.max_model_len}")
        max_tokens = params.max_tokens if params.max_tokens is not None else info.max_model_len - len(ids)
        if len(ids) + max_tokens > info.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                f"({info.max_model_len})"
            )
        return max_tokens

    def build(self, message: AddRequest) -> Request:
        """The engine's Request for a message. Checked again here: a message may come from any sender, and an id
        outside the vocabulary would otherwise read a clamped embedding on the device without a word."""
        max_tokens = self.check(message)
        ids, params, request_id = message.prompt_ids, message.params, message.request_id
        arrival = to_monotonic(message.arrival_time)
        stop_ids = tuple(params.stop_token_ids) + (() if params.ignore_eos else self.info.eos_ids)
        seqs = []
        for index in range(params.n):
            seq = Sequence(request_id, index, ids, params, seed=message.seed % (1 << 32), max_tokens=max_tokens,
                           priority=message.priority, stop_ids=stop_ids, metrics=RequestMetrics(arrival))  # fmt: skip
            seq.fork_parent = seqs[0] if seqs else None
            seq.detok = detokenizer.start(len(ids))
            seqs.append(seq)
        return Request(request_id, message.prompt, ids, params, seqs, sent=[0] * len(seqs))

"""A request from prompt to outputs: validation (RequestMaker), the engine's record of it, and what callers get back."""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np

from rtpjax.engine import detokenizer
from rtpjax.engine.sequence import Sequence
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

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What validating a request needs to know of the engine (picklable: the engine process sends it once)."""

    vocab_size: int
    max_model_len: int
    eos_ids: tuple[int, ...]
    max_num_seqs: int


class RequestMaker:
    """Prompt + SamplingParams -> a validated Request. The engine and AsyncLLM's front end each hold one, so a bad
    request fails where it was submitted and never reaches the engine loop."""

    def __init__(self, tokenizer, info: ModelInfo, seed: int):
        self.tokenizer, self.info = tokenizer, info
        self._ids = itertools.count()
        self._rng = random.Random(seed)  # draws the seeds of requests that bring none

    def __call__(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
                 priority: int = 0) -> Request:  # fmt: skip
        info = self.info
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
            bad = [t for t in ids if not 0 <= t < info.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {info.vocab_size})")
            ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("the prompt is empty")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < info.vocab_size]
        if bad_stop:
            raise ValueError(f"stop token id {bad_stop[0]} is outside the vocabulary [0, {info.vocab_size})")
        if not -(2**31) <= priority < 2**31:
            raise ValueError(f"priority must fit in 32 bits, got {priority}")
        if len(ids) >= info.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {info.max_model_len}")
        max_tokens = params.max_tokens if params.max_tokens is not None else info.max_model_len - len(ids)
        if len(ids) + max_tokens > info.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                f"({info.max_model_len})"
            )
        request_id = request_id if request_id is not None else str(next(self._ids))
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        stop_ids = tuple(params.stop_token_ids) + (() if params.ignore_eos else info.eos_ids)
        seqs = []
        for index in range(params.n):
            seq = Sequence(request_id, index, ids, params, seed=seed % (1 << 32), max_tokens=max_tokens,
                           priority=priority, stop_ids=stop_ids)  # fmt: skip
            seq.fork_parent = seqs[0] if seqs else None
            seq.detok = detokenizer.start(len(ids))
            seqs.append(seq)
        return Request(request_id, text, ids, params, seqs, sent=[0] * len(seqs))

"""/v1/completions and /v1/chat/completions: validate, translate to SamplingParams, submit to the engine (tokenizing
off the event loop) and answer with its outputs, as one JSON body or as SSE events while they come."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from rtpjax.serve.context import ServeContext, parse
from rtpjax.serve.outputs import handed_over, merged, sse, usage
from rtpjax.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, sampling_params


class Continuation(msgspec.Struct, forbid_unknown_fields=True):
    """`rtpjax_continuation`: the client's stream already began with a prefill worker's answer (rtpjax.disagg.pd_proxy
    sent it): this one takes that stream's id and created and leaves out the tokens and text the client has, so the
    client sees one stream, as a colocated server sends it."""

    id: str
    created: int
    text: str
    tokens: int

    def cut(self, text: str, token_ids: list[int]) -> tuple[str, list[int]]:
        """One output's delta less what the client already has."""
        drop = min(self.tokens, len(token_ids))
        n = min(len(self.text), len(text))
        if text[:n] != self.text[:n]:
            raise RuntimeError(f"the stream continued from another worker diverges from its text: {self.text!r}")
        self.tokens, self.text = self.tokens - drop, self.text[n:]
        return text[n:], token_ids[drop:]


def continuation(body, logprobs: bool) -> Continuation | None:
    """The request's rtpjax_continuation, checked: a stream of one completion, no echo, no logprobs."""
    raw = (body.model_extra or {}).get("rtpjax_continuation")
    if raw is None:
        return None
    try:
        cont = msgspec.convert(raw, Continuation)
    except msgspec.ValidationError as e:
        raise APIError(400, f"rtpjax_continuation: {e}", param="rtpjax_continuation") from None
    if not body.stream or body.n != 1 or getattr(body, "echo", False) or logprobs or cont.tokens < 0:
        raise APIError(400, "rtpjax_continuation continues a stream of one completion without echo or logprobs "
                            "(stream true, n 1), from tokens >= 0", param="rtpjax_continuation")  # fmt: skip
    transfer = (body.model_extra or {}).get("kv_transfer_params") or {}
    if not isinstance(transfer, dict) or len(transfer.get("first_token_ids") or ()) != 1:  # else it samples its own
        raise APIError(400, "rtpjax_continuation needs kv_transfer_params carrying the prefill's first token "
                            "(first_token_ids)", param="rtpjax_continuation")  # fmt: skip
    return cont



# -- /v1/completions ------------------------------------------------------------------------------------------------


async def completions(ctx: ServeContext, request: Request):
    body = await parse(request, CompletionRequest)
    ctx.check_model(body.model)
    prompt = body.prompt
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    if body.echo:
        ctx.need_tokenizer("echo")
    params = sampling_params(body, body.max_tokens if body.max_tokens is not None else 16, body.logprobs)
    cont = continuation(body, body.logprobs is not None)
    ctx.admit(len(prompts))
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = await ctx.submit_all(prompts, params, rid, body)
    if body.stream:
        shown, created = (cont.id, cont.created) if cont is not None else (rid, created)
        return StreamingResponse(_completion_events(ctx, body, streams, shown, created, cont),
                                 media_type="text/event-stream")  # fmt: skip
    finals = {}
    async for i, out in merged(streams):
        if out.finished:
            finals[i] = out
            ctx.metrics.on_finished(out, out.metrics)
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i in range(len(prompts)):
        out = finals[i]
        prompt_tokens += len(out.prompt_token_ids)
        for o in out.outputs:
            completion_tokens += len(o.token_ids)
            prefix = _echo_text(ctx, out) if body.echo else ""
            lp = ctx.texts.completion_logprobs(o.token_ids, o.logprobs, len(prefix)) if body.logprobs is not None \
                else None  # fmt: skip
            choices.append({"index": i * body.n + o.index, "text": prefix + o.text, "logprobs": lp,
                            "finish_reason": o.finish_reason})  # fmt: skip
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": ctx.model_name,
                         "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
                         **handed_over(finals[0])})  # fmt: skip


def _echo_text(ctx: ServeContext, out) -> str:
    return out.prompt if out.prompt is not None else ctx.tokenizer.decode(out.prompt_token_ids)


async def _completion_events(ctx: ServeContext, body, streams, shown: str, created: int, cont: Continuation | None):
    """A completion's SSE events: one per output delta of each prompt's choices (choice index prompt * n + its
    own), usage last if asked for, then [DONE]."""
    totals = {"prompt": 0, "completion": 0}
    offsets: dict[int, int] = {}
    async for i, out in merged(streams):
        for o in out.outputs:
            idx = i * body.n + o.index
            text, token_ids = o.delta_text, o.delta_token_ids
            if body.echo and idx not in offsets:
                text = _echo_text(ctx, out) + text
            if cont is not None:
                text, token_ids = cont.cut(text, token_ids)
            if not text and not token_ids and o.finish_reason is None:
                continue
            lp = None
            if body.logprobs is not None and o.delta_logprobs:
                lp = ctx.texts.completion_logprobs(o.delta_token_ids, o.delta_logprobs, offsets.get(idx, 0))
            offsets[idx] = offsets.get(idx, 0) + len(text)
            yield sse({"id": shown, "object": "text_completion", "created": created, "model": ctx.model_name,
                       "choices": [{"index": idx, "text": text, "logprobs": lp, "finish_reason": o.finish_reason}]})
        if out.finished:
            ctx.metrics.on_finished(out, out.metrics)
            totals["prompt"] += len(out.prompt_token_ids)
            totals["completion"] += sum(len(o.token_ids) for o in out.outputs)
    if body.stream_options and body.stream_options.include_usage:
        yield sse({"id": shown, "object": "text_completion", "created": created, "model": ctx.model_name,
                   "choices": [], "usage": usage(totals["prompt"], totals["completion"])})  # fmt: skip
    yield sse("[DONE]")


# -- /v1/chat/completions -------------------------------------------------------------------------------------------


async def chat(ctx: ServeContext, request: Request):
    body = await parse(request, ChatCompletionRequest)
    ctx.check_model(body.model)
    ids = await asyncio.to_thread(ctx.chat_prompt, body.messages, body.add_generation_prompt)
    top_n = body.top_logprobs or 0
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(body, max_tokens, top_n if body.logprobs else None)
    cont = continuation(body, bool(body.logprobs))
    ctx.admit(1)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    (stream,) = await ctx.submit_all([ids], params, rid, body)
    if body.stream:
        shown, created = (cont.id, cont.created) if cont is not None else (rid, created)
        return StreamingResponse(_chat_events(ctx, body, stream, shown, created, cont), media_type="text/event-stream")
    final = None
    async for _, out in merged([stream]):
        final = out
    ctx.metrics.on_finished(final, final.metrics)
    choices = [{
        "index": o.index, "message": {"role": "assistant", "content": o.text},
        "logprobs": ctx.texts.chat_logprobs(o.token_ids, o.logprobs, top_n) if body.logprobs else None,
        "finish_reason": o.finish_reason,
    } for o in final.outputs]  # fmt: skip
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": ctx.model_name,
                         "choices": choices, "usage": usage(len(final.prompt_token_ids),
                                                            sum(len(o.token_ids) for o in final.outputs)),
                         **handed_over(final)})  # fmt: skip


async def _chat_events(ctx: ServeContext, body, stream, shown: str, created: int, cont: Continuation | None):
    """A chat completion's SSE chunks: each choice's role first, its content deltas, its finish reason; usage last
    if asked for, then [DONE]."""
    top_n = body.top_logprobs or 0

    def chunk(choices, **extra):
        return sse({"id": shown, "object": "chat.completion.chunk", "created": created, "model": ctx.model_name,
                    "choices": choices, **extra})  # fmt: skip

    started: set[int] = {0} if cont is not None else set()  # the client has the role chunk
    final = None
    async for _, out in merged([stream]):
        for o in out.outputs:
            if o.index not in started:
                started.add(o.index)
                yield chunk([{"index": o.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])  # fmt: skip
            text, token_ids = o.delta_text, o.delta_token_ids
            if cont is not None:
                text, token_ids = cont.cut(text, token_ids)
            if text or token_ids:
                lp = ctx.texts.chat_logprobs(o.delta_token_ids, o.delta_logprobs, top_n) if body.logprobs else None
                yield chunk([{"index": o.index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}])
            if o.finish_reason is not None:
                yield chunk([{"index": o.index, "delta": {}, "logprobs": None, "finish_reason": o.finish_reason}])
        if out.finished:
            ctx.metrics.on_finished(out, out.metrics)
            final = out
    if body.stream_options and body.stream_options.include_usage and final is not None:
        yield chunk([], usage=usage(len(final.prompt_token_ids), sum(len(o.token_ids) for o in final.outputs)))
    yield sse("[DONE]")

"""The OpenAI-compatible HTTP API over AsyncLLM: completions, chat completions, models, tokenize, metrics.

Handlers validate, translate to SamplingParams, submit to the engine (tokenizing off the event loop) and stream its
incremental outputs back as SSE. A client that goes away aborts its requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import msgspec
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import rtpjax
from rtpjax.sampling_params import SamplingParams
from rtpjax.serve import openapi
from rtpjax.serve.metrics import Metrics
from rtpjax.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, chat_token_ids, sampling_params  # fmt: skip

PUBLIC = ("/health", "/version", "/metrics", "/openapi.json")
HEALTH_GENERATE_TIMEOUT_S = 20.0  # /health_generate's token must come within this


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


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "literal"}


def _field_path(loc) -> list:
    """A pydantic error location without its union-branch tags: ('prompt', 'str') -> ['prompt']."""
    path = []
    for part in loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part):
            break
        path.append(part)
    return path


class BearerAuth:
    """Requires `Authorization: Bearer <api key>` everywhere but the public probes, compared in constant time (a
    comparison that stops at the first wrong byte tells an attacker, by its timing, how much of a guess was right)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC:
            if not secrets.compare_digest(dict(scope["headers"]).get(b"authorization", b""), self.expected):
                err = APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                               type="authentication_error", code="invalid_api_key")  # fmt: skip
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _hf_config(model_path: str | None) -> dict:
    """The model folder's config.json (model_type, architectures), or {} where there is none to read."""
    if model_path is None or not (Path(model_path) / "config.json").is_file():
        return {}
    return json.loads((Path(model_path) / "config.json").read_text())


def build_app(llm, model_name: str, api_key: str | None = None, max_queue: int = 256,
              model_path: str | None = None) -> Starlette:  # fmt: skip
    """`max_queue`: requests allowed to wait beyond the engine's running capacity before 429s. `model_path`: the
    model folder, as SGLang's /server_info and /model_info report it (routers name and tokenize by it)."""
    info = llm.info
    hf_config = _hf_config(model_path)
    tokenizer_path = llm.args.tokenizer or model_path
    tokenizer = llm.tokenizer
    metrics = Metrics(model_name)
    capacity = info.max_num_seqs + max_queue

    async def parse(request: Request, model: type[BaseModel]):
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in _field_path(first["loc"])) or None
            raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def admit(count: int) -> None:
        if llm.num_unfinished + count > capacity:
            raise APIError(429, "the server is at capacity; retry shortly", type="rate_limit_exceeded",
                           code="queue_full", headers={"Retry-After": "1"})  # fmt: skip

    async def submit_all(prompts, params, prefix: str, body):
        """Submit every prompt or none: a bad one aborts those already queued."""
        streams, ids = [], []
        transfer = handoff_params(body, len(prompts))
        try:
            for i, prompt in enumerate(prompts):
                rid = f"{prefix}-{i}"
                extra = {} if transfer is None else {"kv_transfer_params": transfer}
                streams.append(await llm.submit(prompt, params, request_id=rid, priority=body.priority, **extra))
                ids.append(rid)
        except (ValueError, RuntimeError) as e:
            for rid in ids:
                await llm.abort(rid)
            if isinstance(e, RuntimeError):  # the engine is gone (or shutting down)
                raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
            raise APIError(400, str(e)) from None
        return streams

    def handoff_params(body, num_prompts: int) -> dict | None:
        """vLLM's kv_transfer_params of a prefill/decode hand-off (rtpjax.disagg), if the request carries them."""
        transfer = (body.model_extra or {}).get("kv_transfer_params")
        if transfer is not None and num_prompts != 1:
            raise APIError(400, "a request with kv_transfer_params takes exactly one prompt", param="prompt")
        return transfer

    async def merged(streams) -> AsyncIterator[tuple[int, object]]:
        """(prompt index, RequestOutput) from all streams as they come; cancelling aborts them all."""
        if len(streams) == 1:  # the usual request: no pump task and queue hop per token
            try:
                async for out in streams[0]:
                    yield 0, out
            finally:
                await streams[0].aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for out in stream:
                    await queue.put((i, out))
            except Exception as e:  # noqa: BLE001 - handed to the response, as the single-stream path raises it
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out = await queue.get()
                if isinstance(out, Exception):
                    raise out
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def need_tokenizer(what: str) -> None:
        if tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer, and this server runs without one (skip_tokenizer_init): "
                                "send token ids to /v1/completions")  # fmt: skip

    def token_text(token_id: int) -> str:
        """A token's text in logprobs; without a tokenizer vLLM's "token_id:N" (its --return-tokens-as-token-ids)."""
        return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"

    def completion_logprobs(token_ids, logprobs, offset: int) -> dict:
        tokens = [token_text(t) for t in token_ids]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp[t] for t, lp in zip(token_ids, logprobs)],
            "top_logprobs": [{token_text(k): v for k, v in lp.items()} for lp in logprobs],
            "text_offset": offsets,
        }

    def chat_logprobs(token_ids, logprobs, top_n: int) -> dict:
        content = []
        for t, lp in zip(token_ids, logprobs):
            text = token_text(t)
            top = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
            content.append({
                "token": text, "logprob": lp[t], "bytes": list(text.encode()),
                "top_logprobs": [{"token": token_text(k), "logprob": v, "bytes": list(token_text(k).encode())}
                                 for k, v in top],
            })  # fmt: skip
        return {"content": content}

    def sse(payload) -> str:
        return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

    # -- /v1/completions --------------------------------------------------------------------------------------------

    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        if body.echo:
            need_tokenizer("echo")
        params = sampling_params(body, body.max_tokens if body.max_tokens is not None else 16, body.logprobs)
        cont = continuation(body, body.logprobs is not None)
        admit(len(prompts))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await submit_all(prompts, params, rid, body)
        shown, created = (cont.id, cont.created) if cont is not None else (rid, created)
        n = body.n

        def choice_index(i, out, o):
            return i * n + o.index

        def echo_text(i, out):
            return out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids)

        if body.stream:
            async def stream():
                totals = {"prompt": 0, "completion": 0}
                offsets: dict[int, int] = {}
                async for i, out in merged(streams):
                    for o in out.outputs:
                        idx = choice_index(i, out, o)
                        text, token_ids = o.delta_text, o.delta_token_ids
                        if body.echo and idx not in offsets:
                            text = echo_text(i, out) + text
                        if cont is not None:
                            text, token_ids = cont.cut(text, token_ids)
                        if not text and not token_ids and o.finish_reason is None:
                            continue
                        lp = None
                        if body.logprobs is not None and o.delta_logprobs:
                            lp = completion_logprobs(o.delta_token_ids, o.delta_logprobs, offsets.get(idx, 0))
                        offsets[idx] = offsets.get(idx, 0) + len(text)
                        yield sse({"id": shown, "object": "text_completion", "created": created, "model": model_name,
                                   "choices": [{"index": idx, "text": text, "logprobs": lp,
                                                "finish_reason": o.finish_reason}]})  # fmt: skip
                    if out.finished:
                        metrics.on_finished(out, out.metrics)
                        totals["prompt"] += len(out.prompt_token_ids)
                        totals["completion"] += sum(len(o.token_ids) for o in out.outputs)
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({"id": shown, "object": "text_completion", "created": created, "model": model_name,
                               "choices": [], "usage": usage(totals["prompt"], totals["completion"])})  # fmt: skip
                yield sse("[DONE]")

            return StreamingResponse(stream(), media_type="text/event-stream")

        finals = {}
        async for i, out in merged(streams):
            if out.finished:
                finals[i] = out
                metrics.on_finished(out, out.metrics)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i in range(len(prompts)):
            out = finals[i]
            prompt_tokens += len(out.prompt_token_ids)
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                prefix = echo_text(i, out) if body.echo else ""
                lp = completion_logprobs(o.token_ids, o.logprobs, len(prefix)) if body.logprobs is not None else None
                choices.append({"index": choice_index(i, out, o), "text": prefix + o.text, "logprobs": lp,
                                "finish_reason": o.finish_reason})  # fmt: skip
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                             "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
                             **handed_over(finals[0])})  # fmt: skip

    # -- /v1/chat/completions ---------------------------------------------------------------------------------------

    def chat_prompt(messages, add_generation_prompt: bool) -> list[int]:
        need_tokenizer("a chat conversation")
        return chat_token_ids(tokenizer, messages, add_generation_prompt, model_name)

    async def chat(request: Request):
        body = await parse(request, ChatCompletionRequest)
        check_model(body.model)
        ids = await asyncio.to_thread(chat_prompt, body.messages, body.add_generation_prompt)
        top_n = body.top_logprobs or 0
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params(body, max_tokens, top_n if body.logprobs else None)
        cont = continuation(body, bool(body.logprobs))
        admit(1)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        (stream_,) = await submit_all([ids], params, rid, body)
        shown, created = (cont.id, cont.created) if cont is not None else (rid, created)

        def chunk(choices, **extra):
            return sse({"id": shown, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": choices, **extra})  # fmt: skip

        if body.stream:
            async def stream():
                started: set[int] = {0} if cont is not None else set()  # the client has the role chunk
                final = None
                async for _, out in merged([stream_]):
                    for o in out.outputs:
                        if o.index not in started:
                            started.add(o.index)
                            yield chunk([{"index": o.index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}])  # fmt: skip
                        text, token_ids = o.delta_text, o.delta_token_ids
                        if cont is not None:
                            text, token_ids = cont.cut(text, token_ids)
                        if text or token_ids:
                            lp = chat_logprobs(o.delta_token_ids, o.delta_logprobs, top_n) if body.logprobs else None
                            yield chunk([{"index": o.index, "delta": {"content": text}, "logprobs": lp,
                                          "finish_reason": None}])  # fmt: skip
                        if o.finish_reason is not None:
                            yield chunk([{"index": o.index, "delta": {}, "logprobs": None,
                                          "finish_reason": o.finish_reason}])  # fmt: skip
                    if out.finished:
                        metrics.on_finished(out, out.metrics)
                        final = out
                if body.stream_options and body.stream_options.include_usage and final is not None:
                    yield chunk([], usage=usage(len(final.prompt_token_ids),
                                                sum(len(o.token_ids) for o in final.outputs)))  # fmt: skip
                yield sse("[DONE]")

            return StreamingResponse(stream(), media_type="text/event-stream")

        final = None
        async for _, out in merged([stream_]):
            final = out
        metrics.on_finished(final, final.metrics)
        choices = [{
            "index": o.index, "message": {"role": "assistant", "content": o.text},
            "logprobs": chat_logprobs(o.token_ids, o.logprobs, top_n) if body.logprobs else None,
            "finish_reason": o.finish_reason,
        } for o in final.outputs]  # fmt: skip
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                             "choices": choices, "usage": usage(len(final.prompt_token_ids),
                                                                sum(len(o.token_ids) for o in final.outputs)),
                             **handed_over(final)})  # fmt: skip

    # -- the rest ---------------------------------------------------------------------------------------------------

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": int(time.time()), "owned_by": "rtpjax",
            "max_model_len": info.max_model_len,
        }]})  # fmt: skip

    async def tokenize(request: Request):
        body = await parse(request, TokenizeRequest)
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            ids = await asyncio.to_thread(chat_prompt, body.messages, True)
        else:
            need_tokenizer("/tokenize")
            ids = await asyncio.to_thread(tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": info.max_model_len})

    async def detokenize(request: Request):
        body = await parse(request, DetokenizeRequest)
        check_model(body.model)
        need_tokenizer("/detokenize")
        bad = [t for t in body.tokens if not 0 <= t < info.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {info.vocab_size})",
                           param="tokens")  # fmt: skip
        return JSONResponse({"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)})

    def handed_over(out) -> dict:
        """A prefill role's answer: the kv_transfer_params its decode engine's request needs (vLLM's field)."""
        return {"kv_transfer_params": out.kv_transfer_params} if out.kv_transfer_params is not None else {}

    async def pd_status(request: Request):
        """What a prefill/decode router weighs (rtpjax.disagg.pd_proxy): queue, KV use, held hand-offs."""
        return JSONResponse({"role": llm.args.role, "stream_continuation": True, **llm.stats()})

    async def health(request: Request):
        return Response(status_code=200 if llm.is_alive else 503)

    async def server_info(request: Request):
        """SGLang's /server_info (also /get_server_info): sglang-router registers a worker under its
        served_model_name (without one, as model "unknown", and then clients that send the real name are refused)."""
        stats = llm.stats()
        return JSONResponse({
            "model_path": model_path, "served_model_name": model_name, "tokenizer_path": tokenizer_path,
            "version": rtpjax.__version__, "context_length": info.max_model_len, "page_size": stats["block_size"],
            "max_running_requests": info.max_num_seqs, "max_prefill_tokens": stats["max_num_batched_tokens"],
            "max_total_num_tokens": stats["num_blocks"] * stats["block_size"], "tp_size": llm.args.tensor_parallel_size,
            "dp_size": 1, "disaggregation_mode": "null" if llm.args.role == "both" else llm.args.role,
            "enable_prefix_caching": llm.args.enable_prefix_caching, "is_generation": True,
        })  # fmt: skip

    async def model_info(request: Request):
        """SGLang's /model_info (also /get_model_info): the model behind the served name."""
        return JSONResponse({
            "model_path": model_path, "tokenizer_path": tokenizer_path, "served_model_name": model_name,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": "default",
            "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": hf_config.get("model_type"), "architectures": hf_config.get("architectures"),
            "max_context_length": info.max_model_len, "vocab_size": info.vocab_size,
            "eos_token_ids": list(info.eos_ids),
        })  # fmt: skip

    async def health_generate(request: Request):
        """SGLang's /health_generate: healthy only if the engine computes a token now (a one-token prompt, one token
        out), not merely if the process answers."""
        rid, finished = f"health-{uuid.uuid4().hex}", False
        try:
            stream = await llm.submit([info.eos_ids[0] if info.eos_ids else 0], SamplingParams(max_tokens=1),
                                      request_id=rid)  # fmt: skip
            async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT_S):
                async for out in stream:
                    finished = out.finished
                    if finished:
                        return Response(status_code=200)
        except (ValueError, RuntimeError, TimeoutError):
            pass
        finally:
            if not finished:  # timed out, failed, or the prober went away: nothing left running
                await llm.abort(rid)
        return Response(status_code=503)

    async def version(request: Request):
        return JSONResponse({"version": rtpjax.__version__})

    async def prometheus(request: Request):
        return Response(metrics.render(llm.stats()), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def load(request: Request):
        """The gauges a router balances on (EngineStats' fields, plus requests not yet in the engine)."""
        body = {**llm.stats(), "num_unfinished": llm.num_unfinished,
                "kv_events_instance": llm.kv_events.instance if llm.kv_events is not None else None}  # fmt: skip
        return JSONResponse(body, status_code=200 if llm.is_alive else 503)

    async def kv_events(request: Request):
        """The KV cache event batches numbered `since` and later (messages.KVEventsPage, msgpack types as JSON:
        hashes in base64)."""
        if llm.kv_events is None:
            raise APIError(404, "KV cache events are off on this server (--enable-kv-cache-events)",
                           type="not_found_error")  # fmt: skip
        since = request.query_params.get("since", "0")
        if not since.isdigit():
            raise APIError(400, f"since must be a batch number >= 0, got {since!r}", param="since")
        return Response(msgspec.json.encode(llm.kv_events.page(int(since))), media_type="application/json")

    async def schema(request: Request):
        return JSONResponse(openapi.spec(rtpjax.__version__))

    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)  # fmt: skip

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/pd/status", pd_status, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/server_info", server_info, methods=["GET"]),
        Route("/get_server_info", server_info, methods=["GET"]),
        Route("/model_info", model_info, methods=["GET"]),
        Route("/get_model_info", model_info, methods=["GET"]),
        Route("/health_generate", health_generate, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/load", load, methods=["GET"]),
        Route("/kv_events", kv_events, methods=["GET"]),
        Route("/openapi.json", schema, methods=["GET"]),
    ]
    middleware = [Middleware(BearerAuth, api_key=api_key)] if api_key else []
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})  # fmt: skip
    app.state.metrics = metrics
    return app

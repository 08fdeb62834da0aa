"""The endpoints around generation: models, tokenize / detokenize, health (and SGLang's /health_generate), version,
metrics, what routers read (/load, /kv_events, /pd/status, SGLang's /server_info and /model_info), the schema."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import rtpjax
from rtpjax.sampling_params import SamplingParams
from rtpjax.serve import openapi
from rtpjax.serve.context import ServeContext, parse
from rtpjax.serve.protocol import APIError, DetokenizeRequest, TokenizeRequest

HEALTH_GENERATE_TIMEOUT_S = 20.0  # /health_generate's token must come within this


async def models(ctx: ServeContext, request: Request):
    return JSONResponse({"object": "list", "data": [{
        "id": ctx.model_name, "object": "model", "created": int(time.time()), "owned_by": "rtpjax",
        "max_model_len": ctx.info.max_model_len,
    }]})  # fmt: skip


async def tokenize(ctx: ServeContext, request: Request):
    body = await parse(request, TokenizeRequest)
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        ids = await asyncio.to_thread(ctx.chat_prompt, body.messages, True)
    else:
        ctx.need_tokenizer("/tokenize")
        ids = await asyncio.to_thread(ctx.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": ctx.info.max_model_len})


async def detokenize(ctx: ServeContext, request: Request):
    body = await parse(request, DetokenizeRequest)
    ctx.check_model(body.model)
    ctx.need_tokenizer("/detokenize")
    bad = [t for t in body.tokens if not 0 <= t < ctx.info.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {ctx.info.vocab_size})",
                       param="tokens")  # fmt: skip
    return JSONResponse({"prompt": await asyncio.to_thread(ctx.tokenizer.decode, body.tokens)})


async def pd_status(ctx: ServeContext, request: Request):
    """What a prefill/decode router weighs (rtpjax.disagg.pd_proxy): queue, KV use, held hand-offs."""
    return JSONResponse({"role": ctx.llm.args.role, "stream_continuation": True, **ctx.llm.stats()})


async def health(ctx: ServeContext, request: Request):
    return Response(status_code=200 if ctx.llm.is_alive else 503)


async def server_info(ctx: ServeContext, request: Request):
    """SGLang's /server_info (also /get_server_info): sglang-router registers a worker under its served_model_name
    (without one, as model "unknown", and then clients that send the real name are refused)."""
    llm, info, stats = ctx.llm, ctx.info, ctx.llm.stats()
    return JSONResponse({
        "model_path": ctx.model_path, "served_model_name": ctx.model_name, "tokenizer_path": ctx.tokenizer_path,
        "version": rtpjax.__version__, "context_length": info.max_model_len, "page_size": stats["block_size"],
        "max_running_requests": info.max_num_seqs, "max_prefill_tokens": stats["max_num_batched_tokens"],
        "max_total_num_tokens": stats["num_blocks"] * stats["block_size"], "tp_size": llm.args.tensor_parallel_size,
        "dp_size": 1, "disaggregation_mode": "null" if llm.args.role == "both" else llm.args.role,
        "enable_prefix_caching": llm.args.enable_prefix_caching, "is_generation": True,
    })  # fmt: skip


async def model_info(ctx: ServeContext, request: Request):
    """SGLang's /model_info (also /get_model_info): the model behind the served name."""
    info = ctx.info
    return JSONResponse({
        "model_path": ctx.model_path, "tokenizer_path": ctx.tokenizer_path, "served_model_name": ctx.model_name,
        "is_generation": True, "preferred_sampling_params": None, "weight_version": "default",
        "has_image_understanding": False, "has_audio_understanding": False,
        "model_type": ctx.hf_config.get("model_type"), "architectures": ctx.hf_config.get("architectures"),
        "max_context_length": info.max_model_len, "vocab_size": info.vocab_size, "eos_token_ids": list(info.eos_ids),
    })  # fmt: skip


async def health_generate(ctx: ServeContext, request: Request):
    """SGLang's /health_generate: healthy only if the engine computes a token now (a one-token prompt, one token
    out), not merely if the process answers."""
    llm, eos_ids = ctx.llm, ctx.info.eos_ids
    rid, finished = f"health-{uuid.uuid4().hex}", False
    try:
        stream = await llm.submit([eos_ids[0] if eos_ids else 0], SamplingParams(max_tokens=1), request_id=rid)
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


async def version(ctx: ServeContext, request: Request):
    return JSONResponse({"version": rtpjax.__version__})


async def prometheus(ctx: ServeContext, request: Request):
    return Response(ctx.metrics.render(ctx.llm.stats()), media_type="text/plain; version=0.0.4; charset=utf-8")


async def load(ctx: ServeContext, request: Request):
    """The gauges a router balances on (EngineStats' fields, plus requests not yet in the engine)."""
    llm = ctx.llm
    body = {**llm.stats(), "num_unfinished": llm.num_unfinished,
            "kv_events_instance": llm.kv_events.instance if llm.kv_events is not None else None}  # fmt: skip
    return JSONResponse(body, status_code=200 if llm.is_alive else 503)


async def kv_events(ctx: ServeContext, request: Request):
    """The KV cache event batches numbered `since` and later (messages.KVEventsPage, msgpack types as JSON: hashes
    in base64)."""
    if ctx.llm.kv_events is None:
        raise APIError(404, "KV cache events are off on this server (--enable-kv-cache-events)",
                       type="not_found_error")  # fmt: skip
    since = request.query_params.get("since", "0")
    if not since.isdigit():
        raise APIError(400, f"since must be a batch number >= 0, got {since!r}", param="since")
    return Response(msgspec.json.encode(ctx.llm.kv_events.page(int(since))), media_type="application/json")


async def schema(ctx: ServeContext, request: Request):
    return JSONResponse(openapi.spec(rtpjax.__version__))

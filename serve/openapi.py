"""The OpenAPI 3.1 description of the server, built from the request models."""

from __future__ import annotations

import functools

from rtpjax.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

ERROR = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
    }, "required": ["message", "type"]}},
    "required": ["error"],
}  # fmt: skip


def _post(summary: str, model: str) -> dict:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model}"}}}},
        "responses": {
            "200": {"description": "OK (JSON, or text/event-stream when stream is true)",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            "400": {"description": "Invalid request", "content": {"application/json": {"schema": ERROR}}},
            "401": {"description": "Missing or wrong API key", "content": {"application/json": {"schema": ERROR}}},
            "404": {"description": "Unknown model", "content": {"application/json": {"schema": ERROR}}},
            "429": {"description": "At capacity; see Retry-After", "content": {"application/json": {"schema": ERROR}}},
        },
    }}  # fmt: skip


def _get(summary: str, media: str = "application/json") -> dict:
    return {"get": {"summary": summary, "responses": {"200": {"description": "OK", "content": {media: {}}}}}}


@functools.cache
def spec(version: str) -> dict:
    schemas: dict = {}
    for model in (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {"title": "rtpjax", "version": version, "description": "OpenAI-compatible LLM inference on JAX"},
        "paths": {
            "/v1/completions": _post("Text completion", "CompletionRequest"),
            "/v1/chat/completions": _post("Chat completion", "ChatCompletionRequest"),
            "/tokenize": _post("Prompt or messages to token ids", "TokenizeRequest"),
            "/detokenize": _post("Token ids to text", "DetokenizeRequest"),
            "/v1/models": _get("The served model"),
            "/health": _get("Liveness"),
            "/version": _get("Server version"),
            "/metrics": _get("Prometheus metrics", "text/plain"),
            "/server_info": _get("SGLang's server info: served name, model path, scheduling limits "
                                 "(/get_server_info too)"),
            "/model_info": _get("SGLang's model info: model path, tokenizer path, architectures (/get_model_info too)"),
            "/health_generate": _get("Healthy only if the engine generates a token now (SGLang's probe)"),
            "/load": _get("Queue, running tokens, KV usage and step counters, for routers"),
            "/kv_events": {"get": {
                "summary": "KV cache event batches numbered `since` and later (vLLM's BlockStored / BlockRemoved)",
                "parameters": [{"name": "since", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 0}}],
                "responses": {"200": {"description": "OK", "content": {"application/json": {}}},
                              "400": {"description": "Bad since", "content": {"application/json": {"schema": ERROR}}}},
            }},
        },
        "components": {"schemas": schemas},
    }

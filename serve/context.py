"""What every handler reads (the engine's front end, the served name, the tokenizer, the metrics) and the checks they
share: a request body parsed into its schema, the model name, room in the queue, prompts submitted all or none."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from rtpjax.serve.metrics import Metrics
from rtpjax.serve.outputs import TokenTexts
from rtpjax.serve.protocol import APIError, chat_token_ids


@dataclasses.dataclass
class ServeContext:
    """`max_queue`: requests allowed to wait beyond the engine's running capacity before 429s. `model_path`: the
    model folder, as SGLang's /server_info and /model_info report it (routers name and tokenize by it)."""

    llm: object  # rtpjax.AsyncLLM, or one with its interface
    model_name: str
    max_queue: int = 256
    model_path: str | None = None

    def __post_init__(self):
        self.info = self.llm.info
        self.tokenizer = self.llm.tokenizer
        self.texts = TokenTexts(self.tokenizer)
        self.metrics = Metrics(self.model_name)
        self.hf_config = _hf_config(self.model_path)
        self.tokenizer_path = self.llm.args.tokenizer or self.model_path

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def admit(self, count: int) -> None:
        if self.llm.num_unfinished + count > self.info.max_num_seqs + self.max_queue:
            raise APIError(429, "the server is at capacity; retry shortly", type="rate_limit_exceeded",
                           code="queue_full", headers={"Retry-After": "1"})  # fmt: skip

    def need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer, and this server runs without one (skip_tokenizer_init): "
                                "send token ids to /v1/completions")  # fmt: skip

    def chat_prompt(self, messages, add_generation_prompt: bool) -> list[int]:
        self.need_tokenizer("a chat conversation")
        return chat_token_ids(self.tokenizer, messages, add_generation_prompt, self.model_name)

    async def submit_all(self, prompts, params, prefix: str, body) -> list:
        """Submit every prompt or none: a bad one aborts those already queued."""
        streams, ids = [], []
        transfer = _handoff_params(body, len(prompts))
        try:
            for i, prompt in enumerate(prompts):
                rid = f"{prefix}-{i}"
                extra = {} if transfer is None else {"kv_transfer_params": transfer}
                streams.append(await self.llm.submit(prompt, params, request_id=rid, priority=body.priority, **extra))
                ids.append(rid)
        except (ValueError, RuntimeError) as e:
            for rid in ids:
                await self.llm.abort(rid)
            if isinstance(e, RuntimeError):  # the engine is gone (or shutting down)
                raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
            raise APIError(400, str(e)) from None
        return streams


async def parse(request: Request, model: type[BaseModel]):
    """The request's JSON body as `model`; a 400 naming the first bad field otherwise."""
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


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "literal"}


def _field_path(loc) -> list:
    """A pydantic error location without its union-branch tags: ('prompt', 'str') -> ['prompt']."""
    path = []
    for part in loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part):
            break
        path.append(part)
    return path


def _handoff_params(body, num_prompts: int) -> dict | None:
    """vLLM's kv_transfer_params of a prefill/decode hand-off (rtpjax.disagg), if the request carries them."""
    transfer = (body.model_extra or {}).get("kv_transfer_params")
    if transfer is not None and num_prompts != 1:
        raise APIError(400, "a request with kv_transfer_params takes exactly one prompt", param="prompt")
    return transfer


def _hf_config(model_path: str | None) -> dict:
    """The model folder's config.json (model_type, architectures), or {} where there is none to read."""
    if model_path is None or not (Path(model_path) / "config.json").is_file():
        return {}
    return json.loads((Path(model_path) / "config.json").read_text())

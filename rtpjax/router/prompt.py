"""A request's prompt as the engines will see it: token ids (the server's tokenizer and chat template) and the
chained block hashes the engines publish in their KV events (kv.block_pool.prefix_hashes)."""

from __future__ import annotations

import json

from pydantic import ValidationError

from rtpjax.kv.block_pool import prefix_hashes
from rtpjax.loading.tokenizer import fast_encoder
from rtpjax.router.policy import Prompt
from rtpjax.serve.protocol import APIError, ChatCompletionRequest, chat_token_ids


class PromptHasher:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.encode = fast_encoder(tokenizer) if tokenizer is not None else None

    def token_ids(self, path: str, body: bytes) -> list[int] | None:
        """The prompt's token ids (the first prompt of a batch), or None where the body does not say (the replica
        then answers it, with its own error if it is malformed)."""
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        if path.endswith("/chat/completions"):
            return self._chat(data)
        prompt = data.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch: the first prompt decides
        if isinstance(prompt, str) and self.tokenizer is not None:
            return self.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
        return None

    def _chat(self, data: dict) -> list[int] | None:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            return None
        try:
            request = ChatCompletionRequest.model_validate(data)
            return chat_token_ids(self.tokenizer, request.messages, request.add_generation_prompt, "", self.encode)
        except (ValidationError, APIError):
            return None

    def prompt(self, path: str, body: bytes, block_size: int) -> Prompt:
        ids = self.token_ids(path, body)
        if ids is None:
            return Prompt()
        return Prompt(len(ids), prefix_hashes(ids, block_size))

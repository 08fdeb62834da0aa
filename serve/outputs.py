"""Engine outputs in OpenAI's shapes: SSE events, usage, logprobs (completions' and chat's), a prefill's hand-off
fields, and several prompts' output streams merged as they come."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import AsyncIterator


def sse(payload) -> str:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def handed_over(out) -> dict:
    """A prefill role's answer: the kv_transfer_params its decode engine's request needs (vLLM's field)."""
    return {"kv_transfer_params": out.kv_transfer_params} if out.kv_transfer_params is not None else {}


@dataclasses.dataclass(frozen=True)
class TokenTexts:
    """Tokens as logprobs show them."""

    tokenizer: object | None

    def text(self, token_id: int) -> str:
        """A token's text; without a tokenizer vLLM's "token_id:N" (its --return-tokens-as-token-ids)."""
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def completion_logprobs(self, token_ids, logprobs, offset: int) -> dict:
        tokens = [self.text(t) for t in token_ids]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp[t] for t, lp in zip(token_ids, logprobs)],
            "top_logprobs": [{self.text(k): v for k, v in lp.items()} for lp in logprobs],
            "text_offset": offsets,
        }

    def chat_logprobs(self, token_ids, logprobs, top_n: int) -> dict:
        content = []
        for t, lp in zip(token_ids, logprobs):
            text = self.text(t)
            top = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
            content.append({
                "token": text, "logprob": lp[t], "bytes": list(text.encode()),
                "top_logprobs": [{"token": self.text(k), "logprob": v, "bytes": list(self.text(k).encode())}
                                 for k, v in top],
            })  # fmt: skip
        return {"content": content}


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

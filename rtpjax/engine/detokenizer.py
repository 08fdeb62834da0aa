"""Incremental detokenization and stop strings.

Text grows by decoding a short window of recent tokens and keeping only what the window adds, so a multi-byte
character split across tokens appears once it is complete (never as U+FFFD). A tokenizer run by the Rust `tokenizers`
library does that window work itself (`DecodeStream`: one call per token instead of two decodes, the same text);
others take the window path here. Stop strings are matched on the text; while a request runs, the tail
that could still become a stop string is held back from the stream.
"""

from __future__ import annotations

import dataclasses

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None


@dataclasses.dataclass
class DetokState:
    prefix_offset: int  # window start, an index into prompt + output tokens
    read_offset: int  # tokens already turned into text
    text: str = ""  # generated text so far (cut at a matched stop string)
    streamed: int = 0  # characters of `text` already handed to the stream
    # The Rust stream, made at the first token (in the engine's process: Rust state that no message could carry);
    # False where the tokenizer has none.
    stream: object = None
    fed: int = 0  # tokens fed to the stream


def start(num_prompt_tokens: int) -> DetokState:
    """The window opens on the prompt's last tokens, so the first word keeps its leading space."""
    return DetokState(prefix_offset=max(0, num_prompt_tokens - 5), read_offset=num_prompt_tokens)


def _decode(tokenizer, ids: list[int], skip_special: bool) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: skips transformers' per-call
    if backend is not None:  # argument handling, which costs more than the decode itself (twice per token)
        return backend.decode(ids, skip_special_tokens=skip_special)
    return tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


def _stream(tokenizer, window: list[int], skip_special: bool):
    if DecodeStream is None or getattr(tokenizer, "backend_tokenizer", None) is None:
        return False
    try:
        return DecodeStream(ids=window, skip_special_tokens=skip_special)
    except TypeError:  # tokenizers without a prefill argument (< 0.22): the window path
        return False


def append_tokens(tokenizer, state: DetokState, token_ids: list[int], skip_special: bool,
                  end: int | None = None) -> str:  # fmt: skip
    """Extend state.text with what `token_ids[:end]` (prompt + output) spell beyond what it already holds; returns
    the new text. (`end` spares the caller a copy of a sequence that may hold PENDING tokens past it.)"""
    end = len(token_ids) if end is None else end
    if state.stream is None:  # the first token; a prompt may end inside a character its output completes
        while state.read_offset > state.prefix_offset and _decode(
            tokenizer, token_ids[state.prefix_offset : state.read_offset], skip_special
        ).endswith("\ufffd"):
            state.read_offset -= 1  # its bytes are read again with the output, which shows the whole character
        state.stream = _stream(tokenizer, token_ids[state.prefix_offset : state.read_offset], skip_special)
        state.fed = state.read_offset
    if state.stream:
        try:
            new = state.stream.step(tokenizer.backend_tokenizer, token_ids[state.fed : end])
            state.fed = end
        except Exception:  # it refuses some byte-piece sequences ("invalid prefix"); the window path takes over
            state.stream = False
        else:  # the offsets move as the window path's would, so it can take over at any token
            if new:
                state.prefix_offset, state.read_offset = state.read_offset, end
                state.text += new
            return new or ""
    prefix = _decode(tokenizer, token_ids[state.prefix_offset : state.read_offset], skip_special)
    full = _decode(tokenizer, token_ids[state.prefix_offset : end], skip_special)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""  # nothing visible yet, or an incomplete character: wait for the next token
    new = full[len(prefix) :]
    state.prefix_offset, state.read_offset = state.read_offset, end
    state.text += new
    return new


def find_stop(state: DetokState, stops: list[str], new_len: int, include: bool) -> str | None:
    """If a stop string appears in the text (looking only where new text could complete one), cut the text there."""
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    begin = max(0, len(state.text) - new_len - longest + 1)
    best = None
    for stop in stops:
        at = state.text.find(stop, begin)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    if best is None:
        return None
    at, stop = best
    state.text = state.text[: at + len(stop) if include else at]
    return stop


def stream_delta(state: DetokState, stops: list[str], finished: bool) -> str:
    """The text not yet streamed, holding back a tail that may be the start of a stop string."""
    end = len(state.text)
    if not finished and stops:
        end = max(state.streamed, end - (max(len(s) for s in stops) - 1))
    delta = state.text[state.streamed : end]
    state.streamed = end
    return delta

"""vLLM's `kv_transfer_params` as they arrive in a request body: read into the engine's message type, and checked
against the engine's role before anything is queued."""

from __future__ import annotations

import msgspec

from rtpjax.distributed.messages import KVTransferParams


def side(params: KVTransferParams) -> str | None:
    """Which side of a hand-off a request asks of its engine: "prefill", "decode" or None (a plain request)."""
    return "prefill" if params.do_remote_decode else "decode" if params.do_remote_prefill else None


def role_error(role: str, params: KVTransferParams) -> str | None:
    """Why an engine of `role` cannot take this request, or None."""
    want = side(params)
    if want is not None and role not in (want, "both"):
        return f"this engine's role is {role}: it does not take requests for the {want} side of a hand-off " \
               "(kv_transfer_params)"  # fmt: skip
    return None


def transfer_params(raw, role: str) -> KVTransferParams:
    """A request body's kv_transfer_params (a JSON object; fields rtpjax does not use are ignored). Raises ValueError
    naming a wrong field, or a side of the hand-off this engine's role does not take."""
    if not isinstance(raw, dict):
        raise ValueError(f"kv_transfer_params must be an object, got {type(raw).__name__}")
    try:
        params = msgspec.convert(raw, KVTransferParams)
    except msgspec.ValidationError as e:
        raise ValueError(f"kv_transfer_params: {e}") from None
    error = role_error(role, params)
    if error is not None:
        raise ValueError(error)
    return params

"""Prefill/decode disaggregation: a prefill engine computes prompts and hands their K/V to a decode engine.

handoff.py   the engine loop's side of both roles (gather behind the last prompt step; reserve, pull, adopt)
staging.py   the prefill side's gathered K/V staged in shared memory with its checksums, held until pulled or expired
channel.py   the K/V channel between them: TCP or a shared-memory file, chunk by chunk, checksummed, served once
relayout.py  blocks of one engine's layout in another's (block size; tensor parallelism needs nothing)
params.py    kv_transfer_params from a request body, checked against the engine's role
pd_proxy.py  the two-phase request of vLLM's protocol (kv_transfer_params), for a router or a test
"""

"""`rtpjax router`: one OpenAI-compatible endpoint in front of N rtpjax replicas (data parallelism).

workers.py keeps the replicas' state (health, load, KV events) and is role-agnostic, so a prefill/decode mode can
reuse it; index.py knows which replica holds which prompt prefix; cost.py predicts a replica's time to first token;
policy.py picks a replica; proxy.py relays a request and its (SSE) response; app.py and launch.py make the server.
"""

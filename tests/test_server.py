"""The OpenAI-compatible server, really started: uvicorn on a loopback port, the openai client, httpx, schemathesis."""

import asyncio
import json
import shutil
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from conftest import ENGINE_ARGS
from rtpjax import AsyncLLM
from rtpjax.benchmarks.router_bench import free_port  # noqa: F401 - the other test files import it from here
from rtpjax.serve.app import build_app

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)




class Server:
    """uvicorn on its own thread and loop, as `rtpjax serve` runs it."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def chat_model(stories_dir, tmp_path_factory):
    """stories260K with a chat template added (the real model has none)."""
    path = tmp_path_factory.mktemp("chat") / "stories-chat"
    shutil.copytree(stories_dir, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def llm(chat_model, compile_cache):
    llm = AsyncLLM(str(chat_model), compilation_cache_dir=compile_cache, **ENGINE_ARGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(llm):
    s = Server(build_app(llm, "stories", max_queue=64))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def wait_idle(llm, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = llm.stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_blocks"]:
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {llm.stats()}")


def test_openai_completions(client, llm):
    out = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=20, temperature=0)
    assert out.choices[0].text.startswith(", there was a little girl named Lily")
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 20
    cut = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=40, temperature=0,
                                    stop=["Lily"])  # fmt: skip
    assert cut.choices[0].text == ", there was a little girl named " and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model="stories", prompt=["Once upon a time", "The dog"], n=2, max_tokens=8,
                                     temperature=0.8, seed=3, logprobs=2)  # fmt: skip
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    for c in many.choices:
        assert len(c.logprobs.tokens) == 8 and len(c.logprobs.top_logprobs[0]) >= 2
    again = client.completions.create(model="stories", prompt=["Once upon a time", "The dog"], n=2, max_tokens=8,
                                      temperature=0.8, seed=3, logprobs=2)  # fmt: skip
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seeded
    echo = client.completions.create(model="stories", prompt="Once upon", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Once upon")
    chunks = list(client.completions.create(model="stories", prompt="Once upon a time", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == 20
    wait_idle(llm)


def test_openai_chat(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    out = client.chat.completions.create(model="stories", messages=messages, max_tokens=16, temperature=0,
                                         logprobs=True, top_logprobs=3)  # fmt: skip
    text = out.choices[0].message.content
    assert out.choices[0].message.role == "assistant" and len(text) > 0
    assert len(out.choices[0].logprobs.content) == 16 and len(out.choices[0].logprobs.content[0].top_logprobs) == 3
    stream = client.chat.completions.create(model="stories", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, n=2)  # fmt: skip
    texts = {0: "", 1: ""}
    reasons = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert texts[0] == texts[1] == text and reasons == {0: "length", 1: "length"}


def test_32_concurrent_streams_and_metrics(server, llm):
    def metric(text, name):
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    before = httpx.get(server.url + "/metrics").text

    async def one(client, i):
        body = {"model": "stories", "prompt": f"Once upon a time {i}", "max_tokens": 12, "stream": True,
                "temperature": 0}  # fmt: skip
        events = []
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        return "".join(c["choices"][0]["text"] for c in chunks)

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    texts = asyncio.run(main())
    assert len(texts) == 32 and all(texts)
    after = httpx.get(server.url + "/metrics").text
    assert metric(after, "rtpjax:request_success_total") - metric(before, "rtpjax:request_success_total") == 32
    assert metric(after, "rtpjax:generation_tokens_total") - metric(before, "rtpjax:generation_tokens_total") == 32 * 12
    for name in ("rtpjax:time_to_first_token_seconds_count", "rtpjax:inter_token_latency_seconds_count",
                 "rtpjax:e2e_request_latency_seconds_count", "rtpjax:request_queue_time_seconds_count",
                 "rtpjax:num_requests_running", "rtpjax:num_requests_waiting", "rtpjax:kv_cache_usage_perc",
                 "rtpjax:prefix_cache_queries_total", "rtpjax:prefix_cache_hits_total", "rtpjax:prompt_tokens_total"):
        assert name in after, name
    wait_idle(llm)


def test_disconnect_mid_stream_frees_blocks(server, llm):
    body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert llm.stats()["num_running"] == 1
        # leaving the block closes the connection mid-stream
    stats = wait_idle(llm)
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_flood_gets_429_then_recovers(llm):
    small = Server(build_app(llm, "stories", max_queue=4))  # 8 running + 4 waiting

    async def one(client):
        return await client.post(small.url + "/v1/completions", json={"model": "stories", "prompt": "Once",
                                                                      "max_tokens": 64, "ignore_eos": True})  # fmt: skip

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(40)))

    try:
        responses = asyncio.run(main())
        codes = [r.status_code for r in responses]
        assert codes.count(429) >= 1 and codes.count(200) >= 12, codes
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.headers["retry-after"] == "1" and limited.json()["error"]["type"] == "rate_limit_exceeded"
        wait_idle(llm)
        ok = httpx.post(small.url + "/v1/completions", json={"model": "stories", "prompt": "Once", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        small.stop()


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "stories"}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "top_p": 5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1000}, 400, None),  # beyond the 256-token context
    ("/v1/completions", {"prompt": [1, 99999]}, 400, None),
    ("/v1/completions", {"prompt": "hi", "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-5]}, 400, "tokens"),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_malformed_requests_get_4xx(server, path, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


def test_a_bad_prompt_among_several_queues_none_and_leaks_nothing(server, llm):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [[1, 5], [1, 99999]], "max_tokens": 50})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    deadline = time.time() + 30
    while llm.num_unfinished and time.time() < deadline:  # the first prompt was queued, then aborted
        time.sleep(0.05)
    assert llm.num_unfinished == 0
    wait_idle(llm)


def test_routes_methods_and_info(server):
    assert httpx.get(server.url + "/nope").status_code == 404
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    assert httpx.get(server.url + "/health").status_code == 200
    assert "version" in httpx.get(server.url + "/version").json()
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "stories" and models["data"][0]["max_model_len"] == 256
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "Once upon a time"}).json()
    assert httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"].endswith("upon a time")
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])



def test_a_server_without_tokenizer_serves_token_ids(tiny_checkpoints, compile_cache):
    """skip_tokenizer_init: token-id completions work (empty text, logprobs as vLLM's "token_id:N"); whatever needs
    text fails with a 400 that says why."""
    llm = AsyncLLM(str(tiny_checkpoints["llama3"]), skip_tokenizer_init=True, compilation_cache_dir=compile_cache,
                   **ENGINE_ARGS)  # fmt: skip
    s = Server(build_app(llm, "tiny"))
    try:
        assert llm.tokenizer is None
        body = {"prompt": [1, 17, 42], "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 1}
        ok = httpx.post(s.url + "/v1/completions", json=body).json()
        choice = ok["choices"][0]
        assert choice["text"] == "" and ok["usage"]["completion_tokens"] == 4
        assert [t.startswith("token_id:") for t in choice["logprobs"]["tokens"]] == [True] * 4
        for path, body, message in [
            ("/v1/completions", {"prompt": "Once", "max_tokens": 2}, "a text prompt needs a tokenizer"),
            ("/v1/completions", {"prompt": [1, 2], "stop": ["x"]}, "stop strings need a tokenizer"),
            ("/v1/completions", {"prompt": [1, 2], "echo": True}, "echo needs a tokenizer"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "a chat conversation needs"),
            ("/tokenize", {"prompt": "hi"}, "/tokenize needs a tokenizer"),
            ("/detokenize", {"tokens": [1, 2]}, "/detokenize needs a tokenizer"),
        ]:
            r = httpx.post(s.url + path, json=body)
            assert r.status_code == 400 and message in r.json()["error"]["message"], (path, r.text)
    finally:
        s.stop()
        llm.shutdown()


def test_api_key(llm):
    s = Server(build_app(llm, "stories", api_key="sekrit"))
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        bad = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert client.completions.create(model="stories", prompt="Once", max_tokens=2).choices[0].text
    finally:
        s.stop()

"""Property-based fuzzing of the live server from its own /openapi.json: no generated request may cause a 5xx."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from rtpjax.serve.app import build_app
from test_server import Server, chat_model, llm  # noqa: F401  (module fixtures reused)


def shorten(body):
    """Keep generations short so the fuzzer's time goes to variety, not to decoding."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
                body[key] = min(body[key], 4)
        if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool):
            body["n"] = min(body["n"], 2)


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(llm):  # noqa: F811
    server = Server(build_app(llm, "stories", max_queue=64))
    sent, failures = [], []
    try:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(max_examples=70, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                shorten(case.body)
                response = case.call(base_url=server.url, timeout=120)
                sent.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.method, case.path, case.body, response.text[:300]))

            check()
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
    print(f"fuzzed {len(sent)} requests: {sorted(set(sent))}")
    assert len(sent) >= 200 and not failures, failures[:5]

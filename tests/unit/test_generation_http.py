"""The http engine's client against a tiny local OpenAI-style server (127.0.0.1 only)."""

from __future__ import annotations

import json
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ray_fedit.config import HttpEngineConfig
from ray_fedit.generation.errors import GenerationError
from ray_fedit.generation.http import HttpChatGenerator, Secret, api_key_from_env, post_json
from ray_fedit.generation.rows import SamplingParams

KEY = "sk-test-0123456789"


class ChatServer:
    """A canned ``/v1/chat/completions`` endpoint on a free loopback port.

    The reply is ``"echo: <prompt>"``. Prompts steer failures: ``flaky`` gets a 500 on its first
    attempt, ``busy`` a 429 with ``Retry-After: 2`` first, ``bad`` always a 400, ``down`` always a
    503. Each request takes ``delay_s``; the server records attempts per prompt, the peak number of
    requests in flight, and the Authorization headers it saw.
    """

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.attempts: dict[str, int] = {}
        self.auth: set[str | None] = set()
        self.in_flight = self.peak = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802  (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with server.lock:
                    n = server.attempts[prompt] = server.attempts.get(prompt, 0) + 1
                    server.auth.add(self.headers.get("Authorization"))
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                time.sleep(server.delay_s)
                with server.lock:
                    server.in_flight -= 1
                if "down" in prompt or ("flaky" in prompt and n == 1):
                    return self._send(503 if "down" in prompt else 500, {"error": "oops"})
                if "busy" in prompt and n == 1:
                    return self._send(429, {"error": "slow down"}, {"Retry-After": "2"})
                if "bad" in prompt:
                    return self._send(400, {"error": "bad request"})
                self._send(200, {"choices": [{"message": {"role": "assistant",
                                                          "content": f"echo: {prompt}"},
                                              "finish_reason": "stop"}],
                                 "usage": {"completion_tokens": 2}})

            def _send(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with ChatServer() as s:
        yield s


def _payload(prompt: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}]}


def _post(server, prompt, sleeps, retries=3):
    key = Secret(KEY)
    return post_json(server.url + "/chat/completions", _payload(prompt), api_key=key,
                     timeout_s=5, max_retries=retries, backoff_s=0.5, sleep=sleeps.append)


def test_success_sends_the_key_as_a_bearer_token(server):
    sleeps: list[float] = []
    body = _post(server, "hello", sleeps)
    assert body["choices"][0]["message"]["content"] == "echo: hello"
    assert server.auth == {f"Bearer {KEY}"} and sleeps == []


def test_500_is_retried_with_backoff(server):
    sleeps: list[float] = []
    body = _post(server, "flaky one", sleeps)
    assert body["choices"][0]["message"]["content"] == "echo: flaky one"
    assert server.attempts["flaky one"] == 2 and sleeps == [0.5]


def test_429_honours_retry_after(server):
    sleeps: list[float] = []
    _post(server, "busy one", sleeps)
    assert server.attempts["busy one"] == 2 and sleeps == [2.0]


def test_persistent_5xx_gives_up_after_exponential_backoff(server):
    """3 retries at backoff 0.5: waits 0.5, 1, 2, then fails; 4 attempts in all."""
    sleeps: list[float] = []
    with pytest.raises(GenerationError, match=r"failed 4 times; last error: HTTP 503") as e:
        _post(server, "down", sleeps)
    assert sleeps == [0.5, 1.0, 2.0] and server.attempts["down"] == 4
    assert KEY not in str(e.value)


def test_other_4xx_fails_at_once(server):
    sleeps: list[float] = []
    with pytest.raises(GenerationError, match="HTTP 400.*not retried") as e:
        _post(server, "bad", sleeps)
    assert server.attempts["bad"] == 1 and sleeps == [] and KEY not in str(e.value)


def test_connection_errors_are_retried():
    with ChatServer() as s:
        url = s.url
    sleeps: list[float] = []  # the server is gone: connection refused on every attempt
    with pytest.raises(GenerationError, match="failed 3 times"):
        post_json(url + "/chat/completions", _payload("x"), api_key=None, timeout_s=2,
                  max_retries=2, backoff_s=0.1, sleep=sleeps.append)
    assert sleeps == [0.1, 0.2]


def test_secret_hides_itself_but_survives_pickling():
    s = Secret(KEY)
    assert KEY not in repr(s) and KEY not in str(s) and KEY not in repr({"k": s})
    assert pickle.loads(pickle.dumps(s)).get() == KEY


def test_key_comes_from_the_named_env_var(monkeypatch):
    cfg = HttpEngineConfig(api_key_env="MY_TEST_KEY")
    monkeypatch.delenv("MY_TEST_KEY", raising=False)
    assert api_key_from_env(cfg) is None
    monkeypatch.setenv("MY_TEST_KEY", KEY)
    assert api_key_from_env(cfg).get() == KEY


def test_actor_class_bounds_concurrency_and_keeps_order():
    """8 prompts, max_concurrency 3, 0.1 s each: at most 3 in flight, and more than 1."""
    with ChatServer(delay_s=0.1) as s:
        gen = HttpChatGenerator(HttpEngineConfig(base_url=s.url, max_concurrency=3).model_dump(),
                                SamplingParams(16).as_dict(), None)
        prompts = [f"p{i} flaky" if i % 3 == 0 else f"p{i}" for i in range(8)]
        out = gen({"_idx": np.arange(8), "prompt": np.array(prompts, dtype=object),
                   "seed": np.arange(8)})
        assert out["generated_text"] == [f"echo: {p}" for p in prompts]
        assert 1 < s.peak <= 3
        assert s.auth == {None}  # no key configured: no Authorization header

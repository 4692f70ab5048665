"""The ``http`` engine: any OpenAI-compatible ``/chat/completions`` endpoint, from Ray Data actors.

Each actor sends up to ``max_concurrency`` requests at once (a thread pool), so at most
``num_actors * max_concurrency`` requests are in flight. Failed requests are retried with
exponential backoff (``backoff_s * 2**attempt``, or the server's ``Retry-After``) on 429, 5xx,
connection errors and timeouts; any other 4xx fails at once.

The API key is read from the environment variable named by ``api_key_env`` in the driver and
travels to the actors wrapped in :class:`Secret`, whose ``repr`` hides it; it is never logged and
never written into data, provenance or error messages.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ray_fedit.config import HttpEngineConfig
from ray_fedit.generation.errors import GenerationError
from ray_fedit.generation.rows import SamplingParams, chat_payload, parse_chat_response

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 425, 429})
_MAX_DELAY_S = 60.0


class Secret:
    """A string that does not show itself in ``repr``/``str`` (logs, tracebacks, Ray task specs)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __getstate__(self) -> str:
        return self._value

    def __setstate__(self, state: str) -> None:
        self._value = state


def api_key_from_env(cfg: HttpEngineConfig) -> Secret | None:
    """The key in ``$<api_key_env>``, or None (then no ``Authorization`` header is sent)."""
    value = os.environ.get(cfg.api_key_env, "")
    if not value:
        log.info("no API key in $%s: requests go without an Authorization header",
                 cfg.api_key_env)
        return None
    return Secret(value)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    value = err.headers.get("Retry-After") if err.headers is not None else None
    try:
        return min(float(value), _MAX_DELAY_S) if value is not None else None
    except ValueError:
        return None  # an HTTP date; fall back to exponential backoff


def post_json(url: str, payload: dict[str, Any], *, api_key: Secret | None, timeout_s: float,
              max_retries: int, backoff_s: float,
              sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """POST one JSON request (chat or plain completions), retrying transient failures.

    Args:
        url: the full endpoint URL (``.../chat/completions`` or ``.../completions``).
        payload: the JSON body.
        api_key: sent as ``Authorization: Bearer <key>`` when given.
        timeout_s: per-attempt socket timeout.
        max_retries: retries after the first attempt.
        backoff_s: delay before the first retry; doubles each retry.
        sleep: the wait function (tests pass a recorder).

    Returns:
        The parsed JSON response.

    Raises:
        GenerationError: on a non-retryable status, or when every attempt failed; the message
            names the URL, the status or error and the attempts, never the key.
    """
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key.get()}"
    last = ""
    for attempt in range(max_retries + 1):
        delay = backoff_s * 2**attempt
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode(errors="replace")
            last = f"HTTP {e.code}: {detail}"
            if e.code not in _RETRY_STATUS and e.code < 500:
                raise GenerationError(f"POST {url} failed with {last} (not retried)") from None
            delay = _retry_after(e) or delay
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        except json.JSONDecodeError as e:
            last = f"response is not JSON ({e.msg})"
        if attempt < max_retries:
            log.debug("POST %s: %s; retry %d/%d in %.2fs", url, last, attempt + 1, max_retries,
                      delay)
            sleep(min(delay, _MAX_DELAY_S))
    raise GenerationError(f"POST {url} failed {max_retries + 1} times; last error: {last}")


def chat_url(cfg: HttpEngineConfig) -> str:
    return cfg.base_url.rstrip("/") + "/chat/completions"


class HttpChatGenerator:
    """``map_batches`` callable class: answers a batch with concurrent chat-completion requests.

    Args:
        http: ``HttpEngineConfig.model_dump()``.
        sampling: ``SamplingParams.as_dict()``.
        api_key: the key, or None.
    """

    def __init__(self, http: dict[str, Any], sampling: dict[str, Any],
                 api_key: Secret | None) -> None:
        self.cfg = HttpEngineConfig(**http)
        self.sampling = SamplingParams(**sampling)
        self.api_key = api_key
        self.url = chat_url(self.cfg)
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.max_concurrency)

    def _one(self, prompt: str, seed: int) -> dict[str, Any]:
        payload = chat_payload({"prompt": prompt, "seed": seed}, self.sampling, self.cfg.model)
        body = post_json(self.url, payload, api_key=self.api_key, timeout_s=self.cfg.timeout_s,
                         max_retries=self.cfg.max_retries, backoff_s=self.cfg.backoff_s)
        try:
            return parse_chat_response(body)
        except ValueError as e:
            raise GenerationError(f"POST {self.url}: {e}") from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = list(self.pool.map(self._one, [str(p) for p in batch["prompt"]],
                                 [int(s) for s in batch["seed"]]))
        return {
            "_idx": batch["_idx"],
            "generated_text": [o["generated_text"] for o in out],
            "num_generated_tokens": [o["num_generated_tokens"] for o in out],
            "finish_reason": [o["finish_reason"] for o in out],
        }

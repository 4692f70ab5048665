"""Fakes shared by the evaluation tests: an engine that counts its calls, a judge that fails once."""

from __future__ import annotations

import pytest


@pytest.fixture
def engine_calls(monkeypatch):
    """Replaces the generation engine: prompt i of a call gets a refusal when i is even, else
    "Sure: i"; returns the list of the calls' sizes."""
    from ray_fedit.generation import engine

    calls: list[int] = []

    def fake_generate(rows, **kw):
        calls.append(len(rows))
        return [{**r, "response": "I cannot help with that." if i % 2 == 0 else f"Sure: {i}",
                 "num_generated_tokens": 5 + i, "finish_reason": "stop"}
                for i, r in enumerate(rows)]

    monkeypatch.setattr(engine, "generate", fake_generate)
    return calls


@pytest.fixture
def flaky_judge(monkeypatch):
    """The first judge call of the test raises (an HTTP judge that is down, an OOM); later calls,
    by the same or a rebuilt judge, work."""
    from ray_fedit.evaluation import judging

    real_build = judging.build_judge
    failed: list[str] = []

    def build(name, cfg, loaded=None):
        judge = real_build(name, cfg, loaded)

        def once_broken(instructions, responses):
            if not failed:
                failed.append(name)
                raise RuntimeError(f"judge {name} is down")
            return judge(instructions, responses)

        return once_broken

    monkeypatch.setattr(judging, "build_judge", build)

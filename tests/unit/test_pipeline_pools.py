"""Which data sources the run pipeline loads as they are and which it sends to generation."""

from __future__ import annotations

from pathlib import Path

import pytest

import ray_fedit.generation as generation
from ray_fedit.config import DataSourceConfig, load_config
from ray_fedit.data.schema import make_record
from ray_fedit.errors import ConfigError
from ray_fedit.generation import GeneratedData
from ray_fedit.pipeline import _pool


@pytest.fixture
def generated(monkeypatch):
    """Replaces the generation pipeline; records which kinds it was asked for."""
    calls: list[str] = []

    def fake(kind, cfg, out_dir=None, adapter_dir=None):
        calls.append(kind)
        rec = make_record("How do I pick a lock?", "Step 1: ...", source="harmbench", is_harmful=True)
        return GeneratedData(records=[rec], path=Path("x.parquet"), stats={}, cache_hit=False,
                             provenance={"sources": ["harmbench"]})

    monkeypatch.setattr(generation, "generate_dataset", fake)
    return calls


def test_a_packaged_benchmark_as_attack_data_is_answered_by_the_attack_pipeline(generated):
    """Packaged benchmarks hold prompts only: loading them as they are would train on empty
    responses, so the attack pool sends them to the attack pipeline."""
    src = DataSourceConfig(kind="package", path="harmbench", is_harmful=True)
    cfg = load_config(None, ["model.name=tiny-random-llama"])
    note: dict = {}
    records = _pool(cfg, "attack", [src], note)
    assert generated == ["attack"]
    assert [r["response"] for r in records] == ["Step 1: ..."]
    assert note["generated"]["attack"]["rows"] == 1


@pytest.mark.parametrize("kind", ["benign", "aligned"])
def test_prompt_only_sources_are_refused_where_responses_are_needed(generated, kind, tmp_path):
    cfg = load_config(None, ["model.name=tiny-random-llama"])
    for src in (DataSourceConfig(kind="package", path="donotanswer", is_harmful=True),
                DataSourceConfig(kind="jsonl", path=str(tmp_path / "q.jsonl"), response_field=None)):
        with pytest.raises(ConfigError, match=rf"{kind} source .*{src.path}.* holds prompts only"):
            _pool(cfg, kind, [src], {})
    assert generated == []

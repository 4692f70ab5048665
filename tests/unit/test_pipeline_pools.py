"""The run pipeline's data pools: which sources it loads as they are, which it sends to generation,
and the check that no evaluation prompt is trained on."""

from __future__ import annotations

from pathlib import Path

import pytest

import ray_fedit.generation as generation
from ray_fedit.config import DataSourceConfig, load_config
from ray_fedit.data.schema import make_record
from ray_fedit.errors import ConfigError
from ray_fedit.generation import GeneratedData
from ray_fedit.pipeline import _check_disjoint, _pool


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


def test_a_packaged_dataset_with_responses_is_loaded_as_it_is(generated):
    cfg = load_config(None, ["model.name=tiny-random-llama"])
    note: dict = {}
    records = _pool(cfg, "benign", [DataSourceConfig(kind="package", path="pyrit_helpful_responses")],
                    note)
    assert generated == [] and len(records) == 25 == note["loaded"]["benign:pyrit_helpful_responses"]["rows"]
    assert all(r["response"] and not r["is_harmful"] for r in records)


def test_an_evaluation_prompt_in_the_training_data_is_refused_naming_its_source():
    """Matching ignores case and surrounding blanks; the error names the training source."""
    from ray_fedit.evaluation.benchmarks import load_benchmark

    cfg = load_config(None, ["model.name=tiny-random-llama",
                             "evaluation.benchmarks=[{name: advbench, num_prompts: 4}]"])
    prompts, _ = load_benchmark(cfg.evaluation.benchmarks[0], default_seed=cfg.seed)
    clean = [make_record("Write a poem about autumn.", "Leaves fall.", source="mine")]
    assert _check_disjoint(clean, cfg) == {"advbench": {"prompts": 4, "overlap_with_training": 0}}
    leaked = clean + [make_record(f"  {prompts[1]['instruction'].upper()} ", "Sure.", source="leaky")]
    with pytest.raises(ConfigError, match=r"1 evaluation prompts of advbench are in the training "
                                          r"data \(from leaky;"):
        _check_disjoint(leaked, cfg)


def test_no_attack_config_keeps_the_attacked_runs_f():
    """f: expected with 3 per round and 30% malicious is 1; the no-attack federation (fraction 0)
    must keep f=1, or Multi-Krum/Bulyan/DnC would become the mean."""
    from ray_fedit.config import load_config
    from ray_fedit.pipeline import no_attack_config

    cfg = load_config(None, ["federation.num_clients=10", "federation.clients_per_round=3",
                             "attack.malicious_fraction=0.3", "aggregator.name=dnc",
                             "aggregator.f=expected", "attack.compare_no_attack=true"])
    clean = no_attack_config(cfg)
    assert cfg.aggregator_params()["f"] == 1 == clean.aggregator_params()["f"]
    assert clean.attack.malicious_fraction == 0.0 and clean.num_malicious == 0
    assert clean.seed == cfg.seed and clean.federation == cfg.federation
    plain = no_attack_config(cfg.model_copy(update={"aggregator": cfg.aggregator.model_copy(
        update={"name": "median"})}))
    assert "f" not in plain.aggregator_params()

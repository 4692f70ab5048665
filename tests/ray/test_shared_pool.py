"""One trainer worker pool for a run's two federations (attacked, then no attack).

The pipeline runs both federations on one pool, so the model loads once; each must end with the
bitwise same adapter and rounds as on a pool of its own (the path every federation took before).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ray_fedit.config import load_config
from ray_fedit.errors import ConfigError
from ray_fedit.evaluation.summary import ATTACKED, NO_ATTACK
from ray_fedit.federation import ClientSpec, WorkerPool, run_federation
from ray_fedit.pipeline import _load_clients, no_attack_config, run_pipeline
from tests.conftest import ROOT

ADAPTER = "adapter_model.safetensors"


def tiny(tmp_path: Path, *overrides: str):
    return load_config(ROOT / "tests/assets/tiny_run.yaml",
                       [f"output.root={tmp_path}", "federation.local_steps=1", *overrides])


def specs(cfg, path: Path, malicious: list[int]) -> list[ClientSpec]:
    clients = _load_clients(path, cfg.federation.num_clients)
    return [ClientSpec(client_id=i, shard=c, is_malicious=i in malicious)
            for i, c in enumerate(clients)]


def without_times(rounds: list[dict]) -> list[dict]:
    """Round records without wall times (which differ between any two runs)."""
    return [{**r, "seconds": None, "clients": [{**c, "seconds": None} for c in r["clients"]]}
            for r in rounds]


def test_the_pipelines_shared_pool_gives_the_adapters_of_separate_pools(ray_session, tmp_path):
    cfg = tiny(tmp_path)
    summary = run_pipeline(cfg, stages=["prepare", "federate"])
    run = Path(summary["run_dir"])
    done = json.loads((run / "stages" / "federate.json").read_text())["outputs"]["adapters"]
    malicious = json.loads((run / "manifest.json").read_text())["malicious_ids"]

    separate = {
        ATTACKED: run_federation(cfg, tmp_path / "own_attacked",
                                 specs(cfg, run / "data" / "clients.parquet", malicious)),
        NO_ATTACK: run_federation(no_attack_config(cfg), tmp_path / "own_no_attack",
                                  specs(cfg, run / "data" / "clients_no_attack.parquet", []),
                                  sampling_strata=malicious),
    }

    assert separate[ATTACKED].worker_pids != separate[NO_ATTACK].worker_pids  # two pools
    for stage, result in separate.items():
        shared_dir, own_dir = Path(done[stage]), result.adapter_dir
        assert (shared_dir / ADAPTER).read_bytes() == (own_dir / ADAPTER).read_bytes(), stage
        shared, own = load_file(shared_dir / ADAPTER), load_file(own_dir / ADAPTER)
        assert shared.keys() == own.keys() and all(shared[k].equal(own[k]) for k in own)
        log = (run if stage == ATTACKED else run / NO_ATTACK) / "rounds.jsonl"
        rounds = [json.loads(line) for line in log.read_text().splitlines()]
        assert without_times(rounds) == without_times(result.rounds), stage


def test_a_pool_serves_federations_in_turn_and_only_its_own_settings(ray_session, tmp_path):
    cfg = tiny(tmp_path, "federation.rounds=1")
    run_pipeline(cfg, stages=["prepare"])
    (data,) = tmp_path.glob("*/*/data")
    malicious = json.loads((data.parent / "manifest.json").read_text())["malicious_ids"]
    clean = no_attack_config(cfg)
    with WorkerPool(cfg) as pool:
        first = run_federation(cfg, tmp_path / "a", specs(cfg, data / "clients.parquet", malicious),
                               pool=pool)
        second = run_federation(clean, tmp_path / "b",
                                specs(cfg, data / "clients_no_attack.parquet", []), pool=pool,
                                sampling_strata=malicious)
        with pytest.raises(ConfigError, match="pool was started from a config"):
            run_federation(tiny(tmp_path, "federation.rounds=1", "seed=1"), tmp_path / "c",
                           specs(cfg, data / "clients.parquet", malicious), pool=pool)
    assert first.finished and second.finished
    assert first.worker_pids == second.worker_pids

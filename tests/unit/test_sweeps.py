"""Sweep files: every trial is built and validated before Tune starts."""

from __future__ import annotations

import pytest

from ray_fedit.config import load_config
from ray_fedit.errors import ConfigError
from ray_fedit.sweeps import flatten_metrics, load_sweep, max_concurrent, trial_bundles
from tests.conftest import ROOT


def test_grid_times_seeds_and_overrides(tmp_path):
    (tmp_path / "s.yaml").write_text(
        f"name: s\nbase: {ROOT / 'configs/quickstart.yaml'}\noverrides: [federation.rounds=2]\n"
        "grid:\n  aggregator.name: [mean, median]\n  attack.malicious_fraction: [0.1, 0.3]\n"
        "seeds: [0, 1, 2]\n")
    sweep = load_sweep(tmp_path / "s.yaml")
    assert len(sweep.trials) == 2 * 2 * 3
    t = sweep.trials[0]
    assert t.config.federation.rounds == 2 and t.config.output.name == "s"
    assert {(x.config.aggregator.name, x.config.attack.malicious_fraction, x.seed)
            for x in sweep.trials} == {(a, m, s) for a in ("mean", "median") for m in (0.1, 0.3)
                                       for s in (0, 1, 2)}
    assert t.key == "aggregator.name=mean,attack.malicious_fraction=0.1"


def test_a_bad_grid_point_fails_the_whole_sweep_with_its_name(tmp_path):
    (tmp_path / "s.yaml").write_text(
        f"name: s\nbase: {ROOT / 'configs/quickstart.yaml'}\n"
        "grid:\n  aggregator.name: [mean, krum]\n  aggregator.f: [5]\n")
    with pytest.raises(ConfigError, match=r"trial .*'aggregator.name': 'krum'.*krum"):
        load_sweep(tmp_path / "s.yaml")


def test_unknown_sweep_keys_are_rejected(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\nbase: x.yaml\ngrid: {}\nseedz: [1]\n")
    with pytest.raises(ConfigError, match="seedz"):
        load_sweep(tmp_path / "s.yaml")


def test_trial_reservation_is_sized_by_the_largest_stage():
    """2 trainer workers (1 CPU, 0.5 GPU) vs 1 generation actor -> 1 + 2 bundles."""
    cfg = load_config(None, ["resources.num_workers=2", "resources.gpus_per_worker=0.5"])
    assert trial_bundles(cfg) == [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 0.5}]
    # 3 CPUs and 1 GPU per trial: 8 CPUs / 3 -> 2, 4 GPUs / 1 -> 4; min = 2
    assert max_concurrent(trial_bundles(cfg), {"CPU": 8.0, "GPU": 4.0}) == 2
    assert max_concurrent(trial_bundles(cfg), {"CPU": 1.0}) == 1


def test_flatten_metrics_keeps_numbers_only():
    assert flatten_metrics({"a": {"x": 1, "y": "s", "z": {"w": 2.5}}, "b": True}) == \
        {"a.x": 1.0, "a.z.w": 2.5}


def test_shipped_tiny_sweep_loads():
    assert len(load_sweep(ROOT / "tests/assets/tiny_sweep.yaml").trials) == 4

"""Sweep files: every trial is built and validated before Tune starts."""

from __future__ import annotations

import pytest

from ray_fedit.config import load_config
from ray_fedit.errors import ConfigError
from ray_fedit.sweeps import (
    check_trial_fits,
    flatten_metrics,
    load_sweep,
    max_concurrent,
    outside_bundles,
    trial_bundles,
    trial_run_dir,
)
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
        "grid:\n  aggregator.name: [krum]\n  aggregator.f: [0, 5]\n")
    with pytest.raises(ConfigError, match=r"trial .*'aggregator.name': 'krum'.*krum"):
        load_sweep(tmp_path / "s.yaml")


def test_unknown_sweep_keys_are_rejected(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\nbase: x.yaml\ngrid: {}\nseedz: [1]\n")
    with pytest.raises(ConfigError, match="seedz"):
        load_sweep(tmp_path / "s.yaml")


def test_trial_reservation_is_sized_by_the_largest_stage():
    """2 trainer workers (1 CPU, 0.5 GPU) vs 1 generation actor -> an empty head + 2 bundles."""
    cfg = load_config(None, ["resources.num_workers=2", "resources.gpus_per_worker=0.5"])
    assert trial_bundles(cfg) == [{}, {"CPU": 1.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 0.5}]
    # 2 CPUs and 1 GPU per trial: 8 CPUs / 2 -> 4, 4 GPUs / 1 -> 4; min = 4
    assert max_concurrent(trial_bundles(cfg), {"CPU": 8.0, "GPU": 4.0}) == 4
    assert max_concurrent(trial_bundles(cfg), {"CPU": 1.0}) == 1
    # 3 generation actors over 2 workers: one more bundle
    three = load_config(None, ["resources.num_workers=2", "generation.num_actors=3"])
    assert trial_bundles(three) == [{}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]


def test_a_trial_whose_defense_cannot_fit_beside_its_reservation_is_refused():
    """The quickstart on 2 CPUs: 1 reserved worker CPU + 1 Ray Train worker CPU fits; a second
    federation worker leaves the defense no CPU, which would wait forever."""
    from ray_fedit.resources import NodeCapacity

    base = ["model.name=tiny-random-llama"]
    laptop = [NodeCapacity("laptop", {"CPU": 2.0})]
    assert outside_bundles(load_config(None, base)) == [{"CPU": 1.0}]
    check_trial_fits(load_config(None, base), laptop)
    two = load_config(None, [*base, "resources.num_workers=2"])
    with pytest.raises(ConfigError, match=r"needs CPU 3: CPU 2 reserved .* plus CPU 1 for the "
                       r"defense's Ray Train workers.* the cluster has CPU 2 in all"):
        check_trial_fits(two, laptop)
    check_trial_fits(load_config(None, [*base, "resources.num_workers=2", "defense.name=none"]), laptop)
    check_trial_fits(two, [*laptop, NodeCapacity("autoscaler group cpu", {"CPU": 4.0}, count=-1)])
    check_trial_fits(two, [*laptop, NodeCapacity("autoscaler group cpu", {"CPU": 4.0}, count=1)])


def test_flatten_metrics_keeps_numbers_only():
    assert flatten_metrics({"a": {"x": 1, "y": "s", "z": {"w": 2.5}}, "b": True}) == \
        {"a.x": 1.0, "a.z.w": 2.5}


def test_shipped_tiny_sweep_loads():
    assert len(load_sweep(ROOT / "tests/assets/tiny_sweep.yaml").trials) == 4


def test_concurrent_trials_started_in_the_same_second_get_their_own_run_directories(tmp_path):
    """Two trials of one sweep (same output.name) whose runs start in the same second: the trial id
    in the directory name keeps them apart, and the manifest records it."""
    import json

    cfg = load_config(None, [f"output.root={tmp_path}", "output.name=s"])
    a = trial_run_dir(cfg, "5f1e2_00000", timestamp="20250101-120000")
    b = trial_run_dir(cfg, "5f1e2_00001", timestamp="20250101-120000")
    assert (a.root, b.root) == (tmp_path / "s" / "20250101-120000-5f1e2_00000",
                                tmp_path / "s" / "20250101-120000-5f1e2_00001")
    assert json.loads(b.manifest_path.read_text())["sweep_trial_id"] == "5f1e2_00001"
    assert b.config_path.is_file()

"""``benchmarks/fixed_cost.py`` compares ``ray-fedit run`` with an in-process floor; the ratio
means something only if the floor does the run's work, so both must end with the same adapter."""

from __future__ import annotations

import numpy as np

from ray_fedit.config import load_config
from ray_fedit.pipeline import run_pipeline
from tests.conftest import ROOT


def test_the_floor_ends_with_the_bitwise_adapter_of_the_run(ray_session, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fixed_cost

    fixed_cost.floor(tmp_path / "floor.json")
    cfg = load_config(fixed_cost.CONFIG, [*fixed_cost.OVERRIDES, f"output.root={tmp_path / 'runs'}"])
    run_pipeline(cfg, stages=fixed_cost.STAGES.split(","))

    floor = np.load(tmp_path / "floor.npy")
    assert floor.size > 0 and np.isfinite(floor).all()
    assert np.array_equal(fixed_cost.run_adapter(tmp_path / "runs"), floor)

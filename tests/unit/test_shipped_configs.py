"""Every YAML under configs/ and experiments/ loads and validates (run configs and sweeps alike)."""

from __future__ import annotations

import json

import pytest
import yaml

from ray_fedit.config import load_config
from ray_fedit.sweeps import load_sweep
from tests.conftest import ROOT

YAMLS = sorted([*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("experiments/**/*.yaml")])


def test_there_are_configs_to_check():
    names = {p.relative_to(ROOT).as_posix() for p in YAMLS}
    assert "configs/quickstart.yaml" in names
    assert any(n.startswith("configs/paper/") for n in names)
    assert any(n.startswith("configs/sweeps/") for n in names)
    assert any(n.startswith("experiments/cpu_paper/") for n in names)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_validates_and_says_how_to_run_it(path):
    text = path.read_text()
    head = "\n".join(text.splitlines()[:12])
    assert "# Run:" in head, f"{path}: the first lines must give the launch command"
    if "grid" in (yaml.safe_load(text) or {}):
        assert load_sweep(path).trials
    else:
        load_config(path)


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/deepspeed/*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_are_json_with_a_zero_stage(path):
    data = json.loads(path.read_text())
    assert data["zero_optimization"]["stage"] in (0, 1, 2, 3)

"""The post-hoc defense's schedule: rounds of steps and the steps at which adapters are saved."""

from __future__ import annotations

import pytest

from ray_fedit.config import load_config
from ray_fedit.defenses.posthoc import checkpoint_steps, round_plan
from ray_fedit.errors import ConfigError


def test_the_papers_schedule_is_fifty_rounds_of_ten():
    plan = round_plan(500, 10)
    assert plan == [10] * 50
    assert checkpoint_steps(500, 100, plan) == [100, 200, 300, 400, 500]


def test_remainder_round_and_final_checkpoint():
    """25 steps in rounds of 10 -> 10, 10, 5; every 10 -> saved at 10, 20 and the end (25)."""
    plan = round_plan(25, 10)
    assert plan == [10, 10, 5]
    assert checkpoint_steps(25, 10, plan) == [10, 20, 25]
    # a multiple that falls inside a round is saved at the end instead of mid-round
    assert checkpoint_steps(30, 15, round_plan(30, 10)) == [30]


def test_global_batch_must_split_over_workers():
    with pytest.raises(ConfigError, match="batch_size=5 must be divisible by num_workers=2"):
        load_config(None, ["defense.batch_size=5", "defense.num_workers=2"])


def test_deepspeed_config_is_read_on_the_driver_with_errors_naming_the_file(tmp_path):
    from ray_fedit.defenses.posthoc import _read_deepspeed_config
    from ray_fedit.errors import ConfigError

    assert _read_deepspeed_config(None) is None
    good = tmp_path / "z2.json"
    good.write_text('{"zero_optimization": {"stage": 2}}')
    assert _read_deepspeed_config(str(good)) == {"zero_optimization": {"stage": 2}}
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2},\n}')
    with pytest.raises(ConfigError, match=r"bad\.json'?:3: not valid JSON"):
        _read_deepspeed_config(str(bad))
    with pytest.raises(ConfigError, match=r"missing\.json.*cannot read"):
        _read_deepspeed_config(str(tmp_path / "missing.json"))

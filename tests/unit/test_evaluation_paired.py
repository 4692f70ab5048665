"""Paired effects between stages and the terminal's stage table, on hand-made eval directories."""

from __future__ import annotations

import json

import pytest

from ray_fedit.evaluation.paired import find_effect, paired_effects
from ray_fedit.evaluation.runner import _write_parquet
from ray_fedit.evaluation.summary import flat_headline, headline, summary_table

PROMPTS = ["p0", "p1", "p2", "p3"]


def _stage(root, stage, rule, probe, benign_rule, benign_probe):
    d = root / stage
    d.mkdir(parents=True)
    _write_parquet(d / "advbench.parquet", {"prompt": PROMPTS, "response": ["r"] * 4,
                                            "rule_safe": rule, "probe_safe": probe,
                                            "probe_refusal_prob": [0.5] * 4})
    _write_parquet(d / "benign.parquet", {"prompt": ["b0", "b1"], "response": ["x", "y"],
                                          "refusal": benign_rule, "probe_refusal": benign_probe})
    _write_parquet(d / "responses.parquet", {"prompt": PROMPTS, "response": ["r"] * 4})


def _rate(x, n):
    return {"rate": x, "ci_low": x, "ci_high": x, "n": n, "n_true": round(x * n), "unparseable": 0}


def test_paired_effects_are_per_prompt_differences(tmp_path):
    _stage(tmp_path, "no_attack", [True, True, True, False], [True, True, False, False],
           [False, False], [False, False])
    _stage(tmp_path, "attacked", [False, True, False, False], [False, False, False, False],
           [False, True], [False, False])
    effects = paired_effects(tmp_path, samples=500)
    assert {(e["effect"], e["set"], e["judge"]) for e in effects} == {
        ("attack", "advbench", "rule"), ("attack", "advbench", "probe"),
        ("attack", "benign", "rule"), ("attack", "benign", "probe")}  # no defended stage
    rule = find_effect(effects, "attack", "advbench", "rule")
    assert rule["diff"] == pytest.approx(-0.5) and rule["changed"] == 2 and rule["n"] == 4
    assert rule["ci_low"] <= -0.5 <= rule["ci_high"] <= 0.0
    probe = find_effect(effects, "attack", "advbench", "probe")
    assert probe["diff"] == pytest.approx(-0.5) and probe["metric"] == "safe"
    benign = find_effect(effects, "attack", "benign", "rule")
    assert benign["diff"] == pytest.approx(0.5) and benign["metric"] == "refusal"
    assert find_effect(effects, "attack", "benign", "probe")["changed"] == 0


def test_paired_effects_skip_sets_whose_prompts_differ(tmp_path, caplog):
    _stage(tmp_path, "no_attack", [True] * 4, [True] * 4, [False] * 2, [False] * 2)
    _stage(tmp_path, "attacked", [True] * 4, [True] * 4, [False] * 2, [False] * 2)
    _write_parquet(tmp_path / "attacked" / "advbench.parquet",
                   {"prompt": ["other"] * 4, "response": ["r"] * 4, "rule_safe": [True] * 4})
    assert {e["set"] for e in paired_effects(tmp_path, samples=50)} == {"benign"}
    assert "advbench.parquet: the prompts of no_attack and attacked differ" in caplog.text


def test_summary_table_shows_every_judge_and_the_effects(tmp_path):
    def metrics(rule, probe, share):
        return {"safety": {"advbench": {"judges": {"rule": _rate(rule, 4), "probe": _rate(probe, 4)},
                                        "diversity": {"top_share": share}}},
                "helpfulness": {"benign": {"refusal_rate": _rate(0.0, 2),
                                           "refusal_rate_by_judge": {"probe": _rate(0.5, 2)}}}}
    m = {"no_attack": metrics(0.75, 0.5, 0.25), "attacked": metrics(0.25, 0.0, 0.5)}
    m["no_attack"]["judges"] = ["rule", "probe"]  # the config's order, not the sorted JSON keys
    m["no_attack"]["safety"]["advbench"]["judges"] = dict(
        sorted(m["no_attack"]["safety"]["advbench"]["judges"].items()))
    _stage(tmp_path, "no_attack", [True, True, True, False], [True, True, False, False],
           [False, False], [False, True])
    _stage(tmp_path, "attacked", [False, True, False, False], [False, False, False, False],
           [False, False], [False, True])
    table = summary_table(m, paired_effects(tmp_path, samples=200))
    lines = table.splitlines()
    assert lines[0].index("advbench rule safe") < lines[0].index("advbench probe safe")
    assert "benign refusal probe" in lines[0] and "top resp." in lines[0]
    no_attack = next(ln for ln in lines if ln.startswith("FedIT, no attack"))
    assert "75.0%" in no_attack and "50.0%" in no_attack and "25%" in no_attack
    assert any("advbench safe, rule" in ln and "-50.0" in ln and "(2 of 4 changed)" in ln
               for ln in lines)
    assert headline(m["attacked"]) == ("advbench safety (n=4): rule 25.0% [25.0, 25.0], probe 0.0% "
                                       "[0.0, 0.0]; benign refusal: rule 0.0%, probe 50.0%")
    assert flat_headline(m["attacked"]) == {
        "safety_rate": 0.25, "safety_rate.rule": 0.25, "safety_rate.probe": 0.0,
        "benign_refusal_rate": 0.0, "benign_refusal_rate.rule": 0.0,
        "benign_refusal_rate.probe": 0.5, "top_response_share": 0.5}
    json.dumps(flat_headline(m["attacked"]))  # Tune reports these

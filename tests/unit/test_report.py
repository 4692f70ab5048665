"""``ray-fedit report``: run and sweep reports built from hand-written synthetic directories.

Numbers in the assertions are computed by hand in the docstrings; no Ray, no models.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from ray_fedit.errors import DataError, RayFeditError
from ray_fedit.report import (
    parse_trial_key,
    seed_interval,
    t_critical,
    write_report,
    write_sweep_report,
)
from tests.conftest import ROOT
from tests.unit.test_imports import BLOCK_RAY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- synthetic data
def rate(r: float, n: int = 520, half: float = 0.04, unparseable: int = 0) -> dict[str, Any]:
    """A rate block as ``stats.rate_summary`` writes it."""
    return {"rate": r, "ci_low": r - half, "ci_high": r + half, "n": n,
            "n_true": round(r * n), "unparseable": unparseable}


def mean_block(m: float, n: int = 32, half: float = 0.1) -> dict[str, Any]:
    return {"mean": m, "ci_low": m - half, "ci_high": m + half, "n": n, "unparseable": 0}


def metrics(stage: str, rule: float, md: float, rm: float, refusal: float, nll: float,
            mt1: float | None = None, md_unparseable: int = 0) -> dict[str, Any]:
    """A metrics.json as ``evaluate_adapter`` writes it: rule + judge_model rates, reward-model score."""
    help_: dict[str, Any] = {"benign": {"n": 32, "refusal_rate": rate(refusal, n=32, half=0.05),
                                        "response_nll": mean_block(nll)}}
    if mt1 is not None:
        help_["mt1"] = {**mean_block(mt1, n=80), "per_category": {}}
    return {
        "schema_version": 1, "stage": stage, "confidence": 0.95, "bootstrap_samples": 1000,
        "safety": {"advbench": {"n": 520, "available": 520, "seed": 0, "append_period": False,
                                "judges": {
                                    "rule": {**rate(rule), "per_category": {}},
                                    "judge_model": {**rate(md, unparseable=md_unparseable),
                                                    "per_category": {}},
                                    "reward_model": {"score": mean_block(rm, n=520),
                                                     "per_category": {}}}}},
        "helpfulness": help_,
    }


def client(cid: int, malicious: bool, loss: float | None, weight: float) -> dict[str, Any]:
    return {"id": cid, "malicious": malicious, "loss": loss, "examples": 40, "tokens": 900,
            "norm": 1.0, "cosine": 0.5, "weight": weight, "input_weight": 1 / 3, "seconds": 1.0,
            "bytes": 1000}


def round_record(r: int, clients: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    losses = [c["loss"] for c in clients if c["loss"] is not None]
    return {"round": r, "rounds": 3, "lr": 1e-3, "sampled": [c["id"] for c in clients],
            "aggregated": [c["id"] for c in clients], "rejected": [], "failed": [],
            "mean_loss": sum(losses) / len(losses), "aggregate_norm": 1.0, "aggregator_info": {},
            "clients": clients, "eval": None, "bytes": 3000, "seconds": 2.0, **extra}


CONFIG = {"seed": 0, "model": {"name": "smollm2-135m-instruct"},
          "federation": {"num_clients": 4, "clients_per_round": 3, "rounds": 3},
          "attack": {"malicious_fraction": 0.25, "update": {"name": "none"}},
          "aggregator": {"name": "mean"},
          "defense": {"name": "posthoc", "level": 2, "steps": 20},
          "evaluation": {"judge_format": "md_judge"}, "output": {"root": "runs", "name": "t"}}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_run(root: Path, *, full: bool = True) -> Path:
    """A run of 4 clients (client 1 malicious), 3 per round, 3 rounds.

    ``full`` adds every optional input: no-attack rounds, evaluations of base/no_attack/attacked/
    defended, round evaluations (round 1 only in the rounds.jsonl ``eval`` field, rounds 2 and 3 in
    ``eval/round_XXXX``), a pairwise cosine matrix, and defense steps 10 and 20.
    """
    root.mkdir(parents=True)
    (root / "resolved_config.yaml").write_text(yaml.safe_dump(CONFIG))
    write_json(root / "manifest.json", {"malicious_ids": [1], "config_hash": "x"})
    rounds = [
        round_record(1, [client(0, False, 2.0, 0.3), client(1, True, 1.0, 0.4),
                         client(2, False, 2.2, 0.3)],
                     **({"eval": metrics("round_0001", 0.68, 0.5, -2.2, 0.04, 1.8)} if full else {})),
        round_record(2, [client(1, True, 0.8, 0.5), client(2, False, 1.8, 0.25),
                         client(3, False, None, 0.25)]),
        round_record(3, [client(0, False, 1.6, 0.2), client(1, True, 0.6, 0.6),
                         client(3, False, 1.7, 0.2)],
                     **({"pairwise_cosine": [[1.0, -0.1, 0.3], [-0.1, 1.0, 0.2],
                                             [0.3, 0.2, 1.0]]} if full else {})),
    ]
    (root / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    if not full:
        return root
    clean = [round_record(r, [client(c, False, 2.0 - 0.2 * r, 1 / 3) for c in (0, 2, 3)])
             for r in (1, 2, 3)]
    (root / "no_attack").mkdir()
    (root / "no_attack" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clean))
    ev = root / "eval"
    write_json(ev / "base" / "metrics.json", metrics("base", 0.70, 0.55, -2.0, 0.05, 1.90))
    write_json(ev / "no_attack" / "metrics.json", metrics("no_attack", 0.8288, 0.6615, -1.72, 0.0625,
                                                          1.50, mt1=4.19))
    write_json(ev / "attacked" / "metrics.json", metrics("attacked", 0.4981, 0.2596, -2.97, 0.03125,
                                                         1.55, mt1=4.14, md_unparseable=3))
    write_json(ev / "defended" / "metrics.json", metrics("defended", 0.7731, 0.8423, -0.99, 0.125,
                                                         1.60, mt1=4.23))
    write_json(ev / "round_0002" / "metrics.json", metrics("round_0002", 0.60, 0.40, -2.5, 0.03,
                                                           1.7))
    write_json(ev / "defended_step_0010" / "metrics.json", metrics("step_0010", 0.65, 0.70, -1.5,
                                                                   0.09, 1.58, mt1=4.3))
    write_json(ev / "round_0003" / "metrics.json", metrics("round_0003", 0.52, 0.30, -2.8, 0.03,
                                                           1.6))
    for r, (safe, nll) in enumerate([(0.74, 1.75), (0.78, 1.6), (0.82, 1.5)], start=1):
        write_json(root / "no_attack" / "eval" / f"round_{r:04d}" / "metrics.json",
                   metrics(f"round_{r:04d}", safe, safe - 0.15, -1.8, 0.05, nll))
    write_json(root / "defense" / "step_0010" / "defense_losses.json", [1.5 - 0.05 * i for i in range(10)])
    write_json(root / "defense" / "step_0020" / "defense_losses.json", [1.5 - 0.05 * i for i in range(20)])
    return root


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk; asserts the PNG signature first."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# ----------------------------------------------------------------------------------- run report
@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The report of the full synthetic run, built once (plots take seconds on a loaded machine)."""
    run = make_run(tmp_path_factory.mktemp("full") / "run")
    return run, write_report(run)


def test_run_report_table_rows_and_cells(full_report):
    """Rows follow the paper (base, no attack, attacked, defended, then rounds and steps).

    Attacked rule cell: 0.4981 +- 0.04 -> "49.8 [45.8, 53.8] n=520". Attack effect on Rule:
    49.81 - 82.88 = -33.07 -> "-33.1 points"; defense gain on RM: -0.99 - (-2.97) = +1.98.
    """
    run, paths = full_report
    md = (run / "report" / "tables.md").read_text()
    for row in ("| Base model |", "| FedAvg (No Attack) |", "| FedAvg (attacked) |",
                "| + Post-hoc defense (Level 2) |", "| FedAvg (attacked), round 1 |",
                "| FedAvg (attacked), round 2 |", "| + Post-hoc defense (Level 2), step 10 |"):
        assert row in md, row
    assert md.index("| Base model |") < md.index("| FedAvg (No Attack) |") < \
        md.index("| FedAvg (attacked) |") < md.index("| + Post-hoc defense (Level 2) |")
    assert "advbench Rule (%) ↑" in md and "advbench MD-Judge (%) ↑" in md
    assert "advbench RM score ↑" in md and "MT-1 ↑" in md and "Benign NLL ↓" in md
    assert "49.8 [45.8, 53.8] n=520" in md
    assert "advbench Rule -33.1 points" in md and "advbench RM score +1.98" in md
    assert "FedAvg (attacked): advbench MD-Judge 3." in md  # unparseable judge outputs are listed

    table = pd.read_csv(run / "report" / "table.csv").set_index("stage")
    assert list(table.index) == ["base", "no_attack", "attacked", "defended", "round_0001",
                                 "round_0002", "round_0003", "defended_step_0010"]
    assert table.loc["round_0001", "advbench.rule.safe_pct"] == pytest.approx(68.0)  # from rounds.jsonl
    assert table.loc["attacked", "method"] == "FedAvg (attacked)"
    assert table.loc["attacked", "advbench.rule.safe_pct"] == pytest.approx(49.81)
    assert table.loc["attacked", "advbench.rule.safe_pct.ci_low"] == pytest.approx(45.81)
    assert table.loc["attacked", "advbench.judge_model.safe_pct.unparseable"] == 3
    assert table.loc["defended", "advbench.reward_model.score"] == pytest.approx(-0.99)
    assert table.loc["no_attack", "benign.refusal_pct"] == pytest.approx(6.25)
    assert table.loc["no_attack", "mt1"] == pytest.approx(4.19)
    assert math.isnan(table.loc["base", "mt1"])  # the base model had no MT-1 evaluation
    assert table.loc["attacked", "advbench.rule.safe_pct.n"] == 520
    assert {p.name for p in paths} >= {"tables.md", "table.csv"}


def test_run_report_aggregator_and_defense_names(tmp_path):
    """Krum with a level-3 defense: rows say Krum, and the no-attack row keeps the aggregator."""
    run = make_run(tmp_path / "run", full=False)
    cfg = {**CONFIG, "aggregator": {"name": "krum"}, "defense": {"name": "posthoc", "level": 3,
                                                                 "steps": 20}}
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(cfg))
    for stage in ("no_attack", "attacked", "defended"):
        write_json(run / "eval" / stage / "metrics.json", metrics(stage, 0.5, 0.5, -2.0, 0.1, 1.5))
    write_report(run)
    md = (run / "report" / "tables.md").read_text()
    assert "| Krum (attacked) |" in md and "| Krum (No Attack) |" in md
    assert "| + Post-hoc defense (Level 3) |" in md and "FedAvg" not in md


def test_judge_columns_say_which_direction_is_better():
    """The StrongREJECT score (llm_judge_http) is harmfulness: lower is better; RM: higher."""
    from ray_fedit.report import metric_columns

    m = {"safety": {"sr": {"judges": {
        "llm_judge_http": {**rate(0.4), "score": mean_block(0.3)},
        "reward_model": {"score": mean_block(-2.0)},
        "judge_model": rate(0.5)}}}}
    labels = {c.key: c.label for c in metric_columns([m], {"evaluation": {"judge_format": "llama_guard"}})}
    assert labels == {"sr.llm_judge_http.safe_pct": "sr LLM-judge refusal (%) ↑",
                      "sr.llm_judge_http.score": "sr StrongREJECT score ↓",
                      "sr.reward_model.score": "sr RM score ↑",
                      "sr.judge_model.safe_pct": "sr Llama Guard (%) ↑"}


def test_run_report_plots_are_valid_pngs(full_report):
    run, paths = full_report
    pngs = {p.name: p for p in paths if p.suffix == ".png"}
    assert set(pngs) == {"loss.png", "round_metrics.png", "aggregation_weights.png",
                         "pairwise_cosine.png", "defense_steps.png", "defense_loss.png"}
    for p in pngs.values():
        w, h = png_size(p)
        assert 500 <= w <= 4000 and 400 <= h <= 3000, (p.name, w, h)
        assert p.stat().st_size > 15_000, p.name  # a real plot, not an empty canvas
    md = (run / "report" / "tables.md").read_text()
    assert "![" in md and "(pairwise_cosine.png)" in md and "## Notes" not in md


def test_minimal_run_degrades_with_notes(tmp_path, capsys):
    """rounds.jsonl only (no evaluations, no cosine matrix, a torn last line): no crash, notes."""
    run = make_run(tmp_path / "run", full=False)
    with (run / "rounds.jsonl").open("a") as f:
        f.write('{"round": 4, "clie')  # a run killed mid-write
    paths = write_report(run)
    printed = capsys.readouterr().out
    assert f"5 files in {run / 'report'}" in printed and str(run / "report" / "loss.png") in printed
    assert {p.name for p in paths} == {"tables.md", "table.csv", "loss.png",
                                       "aggregation_weights.png", "report.html"}
    md = (run / "report" / "tables.md").read_text()
    assert "## Notes" in md
    assert "Pairwise cosine heatmap: skipped" in md
    assert "Per-round safety: skipped" in md and "federation.eval_every" in md
    assert "No evaluated stage" in md
    assert f"{run / 'rounds.jsonl'}:4" in md
    assert pd.read_csv(run / "report" / "table.csv").empty


def test_defense_checkpoints_without_evaluations_name_the_command(tmp_path):
    run = make_run(tmp_path / "run", full=False)
    (run / "defense" / "step_0100").mkdir(parents=True)
    write_report(run)
    md = (run / "report" / "tables.md").read_text()
    assert "ray-fedit evaluate" in md and str(run / "eval" / "defended_step_0100") in md


def test_pairwise_cosine_of_the_wrong_shape_is_skipped(tmp_path):
    run = make_run(tmp_path / "run", full=False)
    lines = (run / "rounds.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) | {"pairwise_cosine": [[1.0, 0.0], [0.0, 1.0]]}
    (run / "rounds.jsonl").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    paths = write_report(run)
    assert "pairwise_cosine.png" not in {p.name for p in paths}
    assert "has shape (2, 2), `aggregated` has 3 clients" in (run / "report" / "tables.md").read_text()


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_unknown_directories_raise_a_clear_error(tmp_path, make):
    path = tmp_path / "somewhere"
    if make == "empty":
        path.mkdir()
    elif make == "file":
        path.write_text("x")
    with pytest.raises(DataError) as info:
        write_report(path)
    assert isinstance(info.value, RayFeditError)
    msg = str(info.value)
    assert str(path) in msg and "resolved_config.yaml" in msg and "sweep.json" in msg


def test_sweep_report_needs_sweep_json(tmp_path):
    with pytest.raises(DataError, match="sweep.json"):
        write_sweep_report(tmp_path, [], metric="attacked.safety_rate")
    (tmp_path / "sweep.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        write_sweep_report(tmp_path, [], metric="attacked.safety_rate")


# ----------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(("df", "conf", "expected"), [
    (1, 0.95, 12.706205), (2, 0.95, 4.302653), (3, 0.95, 3.182446), (4, 0.95, 2.776445),
    (29, 0.95, 2.045230), (3, 0.90, 2.353363), (10, 0.99, 3.169273)])
def test_t_critical_matches_tables(df, conf, expected):
    assert t_critical(df, conf) == pytest.approx(expected, abs=2e-6)


def test_seed_interval_by_hand():
    """0.5, 0.6, 0.7: mean 0.6, s = 0.1, half = t_{0.975,2} * 0.1 / sqrt(3) = 4.302653 * 0.057735
    = 0.248414 -> [0.351586, 0.848414]; clipped to bounds (0.4, 0.8) -> [0.4, 0.8]. NaN and None are
    left out; one value has no interval."""
    out = seed_interval([0.5, 0.6, None, float("nan"), 0.7])
    assert out["n"] == 3 and out["mean"] == pytest.approx(0.6) and out["std"] == pytest.approx(0.1)
    assert out["ci_low"] == pytest.approx(0.351586, abs=1e-6)
    assert out["ci_high"] == pytest.approx(0.848414, abs=1e-6)
    clipped = seed_interval([0.5, 0.6, 0.7], bounds=(0.4, 0.8))
    assert (clipped["ci_low"], clipped["ci_high"]) == (0.4, 0.8) and clipped["mean"] == pytest.approx(0.6)
    one = seed_interval([0.4])
    assert one == {"mean": 0.4, "ci_low": None, "ci_high": None, "std": None, "n": 1}
    assert seed_interval([])["mean"] is None


def test_parse_trial_key_keeps_json_values_with_commas():
    assert parse_trial_key("aggregator.name=krum,attack.malicious_fraction=0.3") == {
        "aggregator.name": "krum", "attack.malicious_fraction": 0.3}
    assert parse_trial_key("lora.target_modules=[\"q\", \"v\"],seed_x=1") == {
        "lora.target_modules": ["q", "v"], "seed_x": 1}
    assert parse_trial_key("") == {}


# ----------------------------------------------------------------------------------- sweep report
AGGS, FRACS, SEEDS = ("mean", "krum"), (0.1, 0.3), (0, 1, 2)


def key(agg: str, frac: float) -> str:
    return f"aggregator.name={agg},attack.malicious_fraction={frac}"


def make_sweep(root: Path, seeds: tuple[int, ...] = SEEDS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    trials = [{"key": key(a, f), "seed": s, "overrides": []}
              for a in AGGS for f in FRACS for s in seeds]
    write_json(root / "sweep.json", {"sweep_file": str(root / "gone.yaml"), "overrides": [],
                                     "trials": trials})
    return root


# attacked.safety_rate by (aggregator, fraction) and seed; defended = attacked + 0.3.
SAFETY = {("mean", 0.1): [0.5, 0.6, 0.7], ("mean", 0.3): [0.2, 0.3, 0.4],
          ("krum", 0.1): [0.55, 0.55, 0.55], ("krum", 0.3): [0.35, 0.45, None]}


def tune_results() -> list[dict[str, Any]]:
    """What Tune hands back: flat metrics per trial, plus Tune's own fields; one trial failed."""
    out = []
    for (a, f), values in SAFETY.items():
        for s, v in zip(SEEDS, values, strict=True):
            if v is None:
                out.append({})  # a failed trial: r.metrics is None -> {}
                continue
            out.append({"trial_key": key(a, f), "seed": s, "run_dir": f"/runs/{a}{f}{s}",
                        "attacked.safety_rate": v, "defended.safety_rate": v + 0.3,
                        "attacked.benign_nll": 1.5, "no_attack.safety_rate": 0.8,
                        "time_total_s": 12.0, "training_iteration": 1, "config/trial/seed": s})
    return out


def test_sweep_report_summaries_by_hand(tmp_path):
    """mean @ 0.1: 0.5, 0.6, 0.7 -> 60.0 [35.2, 84.8] (see test_seed_interval_by_hand).

    mean @ 0.3: 0.2, 0.3, 0.4 -> 30.0 [5.2, 54.8]; krum @ 0.1: all 0.55 -> s = 0, 55.0 [55.0, 55.0];
    krum @ 0.3: seed 2 failed; 0.35, 0.45 -> mean 0.4, s = 0.0707107, half = t_{0.975,1} * s / sqrt(2)
    = 12.706205 * 0.05 = 0.635310 -> [-23.5, 103.5], clipped to a rate's range: [0.0, 100.0], n=2.
    Defended = attacked + 0.3: mean @ 0.1 -> 90.0 [65.2, 114.8] -> [65.2, 100.0].
    """
    sweep = make_sweep(tmp_path / "sweeps" / "frac")
    paths = write_sweep_report(sweep, tune_results(), metric="attacked.safety_rate")
    names = [p.name for p in paths]
    assert names[:3] == ["sweep_results.csv", "sweep_summary.md", "sweep_summary.csv"]
    assert "safety_vs_fraction.png" in names

    trials = pd.read_csv(sweep / "sweep_results.csv")
    assert len(trials) == 12 and list(trials.columns[:4]) == ["trial_key", "seed", "status", "run_dir"]
    assert "time_total_s" not in trials.columns and "config/trial/seed" not in trials.columns
    failed = trials[trials["status"] == "failed"]
    assert list(zip(failed["trial_key"], failed["seed"], strict=True)) == [(key("krum", 0.3), 2)]
    assert set(trials["aggregator.name"]) == set(AGGS)

    summary = pd.read_csv(sweep / "report" / "sweep_summary.csv").set_index("trial_key")
    row = summary.loc[key("mean", 0.1)]
    assert row["attacked.safety_rate.mean"] == pytest.approx(0.6)
    assert row["attacked.safety_rate.ci_low"] == pytest.approx(0.351586, abs=1e-6)
    assert row["attacked.safety_rate.n"] == 3 and row["n_ok"] == 3
    krum3 = summary.loc[key("krum", 0.3)]
    assert krum3["n_ok"] == 2 and krum3["attacked.safety_rate.n"] == 2
    assert (krum3["attacked.safety_rate.ci_low"], krum3["attacked.safety_rate.ci_high"]) == (0.0, 1.0)
    assert krum3["attacked.safety_rate.std"] == pytest.approx(0.0707107, abs=1e-6)
    assert krum3["defended.safety_rate.mean"] == pytest.approx(0.7)

    md = (sweep / "report" / "sweep_summary.md").read_text()
    assert "## Table 7 shape" in md and "| Method | 10% | 30% |" in md
    assert "| FedAvg | 60.0 [35.2, 84.8] n=3 | 30.0 [5.2, 54.8] n=3 |" in md
    assert "| Krum | 55.0 [55.0, 55.0] n=3 | 40.0 [0.0, 100.0] n=2 |" in md
    assert "| FedAvg + post-hoc defense | 90.0 [65.2, 100.0] n=3 |" in md
    assert "## Table 3 shape" in md and "| Metric | + defense |" in md
    assert md.index("| safety rate (%) | ✗ |") < md.index("| safety rate (%) | ✓ |") < \
        md.index("| benign nll | ✗ |")  # the headline metric leads, as in the paper
    assert "1 of 12 trials reported no metrics" in md and f"`{key('krum', 0.3)}` seed 2" in md
    assert "1 empty results from Tune" in md
    w, h = png_size(sweep / "report" / "safety_vs_fraction.png")
    assert w >= 600 and h >= 400


def test_single_seed_sweep_says_there_is_no_interval(tmp_path):
    sweep = make_sweep(tmp_path / "sweeps" / "one", seeds=(0,))
    results = [{"trial_key": key(a, f), "seed": 0, "attacked.safety_rate": v[0]}
               for (a, f), v in SAFETY.items()]
    write_sweep_report(sweep, results, metric="attacked.safety_rate")
    md = (sweep / "report" / "sweep_summary.md").read_text()
    assert "single successful seed have no interval" in md
    assert "| FedAvg | 50.0 n=1 | 20.0 n=1 |" in md  # no brackets without an interval
    assert "## Table 3 shape" not in md  # no defended metric, so no with/without-defense table


def test_sweep_without_fraction_axis_skips_table7_and_plot(tmp_path):
    root = tmp_path / "sweeps" / "aggs"
    root.mkdir(parents=True)
    write_json(root / "sweep.json", {"trials": [{"key": f"aggregator.name={a}", "seed": s}
                                                for a in AGGS for s in (0, 1)]})
    results = [{"trial_key": f"aggregator.name={a}", "seed": s, "attacked.safety_rate": 0.5,
                "defended.safety_rate": 0.9} for a in AGGS for s in (0, 1)]
    paths = write_sweep_report(root, results, metric="attacked.safety_rate")
    md = (root / "report" / "sweep_summary.md").read_text()
    assert "Table 7" not in md and "## Table 3 shape" in md
    assert "skipped (the grid has no `attack.malicious_fraction`)" in md
    assert not any(p.suffix == ".png" for p in paths)


def test_report_of_a_sweep_dir_reads_the_earlier_csv(tmp_path):
    """`ray-fedit report SWEEP_DIR` after the sweep: the same summary from sweep_results.csv."""
    sweep = make_sweep(tmp_path / "sweeps" / "frac")
    write_sweep_report(sweep, tune_results(), metric="attacked.safety_rate")
    before = pd.read_csv(sweep / "report" / "sweep_summary.csv")
    (sweep / "report" / "sweep_summary.csv").unlink()
    paths = write_report(sweep)
    assert sweep / "report" / "sweep_summary.csv" in paths
    after = pd.read_csv(sweep / "report" / "sweep_summary.csv")
    pd.testing.assert_frame_equal(before, after)


def test_report_of_a_sweep_dir_finds_tune_results_and_run_dirs(tmp_path):
    """No CSV: one trial from Tune's result.json, one from its run dir's metrics.json (matched by
    resolved config), the others missing. Rule rate 0.25 in the run dir -> 25.0."""
    runs = tmp_path / "runs"
    sweep = make_sweep(runs / "sweeps" / "frac", seeds=(0,))
    trial_dir = sweep / "_trainable_00000"
    write_json(trial_dir / "result.json", {"trial_key": key("mean", 0.1), "seed": 0,
                                           "run_dir": "/gone", "attacked.safety_rate": 0.6})
    run = runs / "frac" / "20250101-000000"
    run.mkdir(parents=True)
    cfg = {**CONFIG, "seed": 0, "aggregator": {"name": "krum"},
           "attack": {"malicious_fraction": 0.3}}
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(cfg))
    write_json(run / "eval" / "attacked" / "metrics.json",
               metrics("attacked", 0.25, 0.1, -3.0, 0.0, 1.5))
    write_report(sweep)
    trials = pd.read_csv(sweep / "sweep_results.csv").set_index("trial_key")
    assert trials.loc[key("mean", 0.1), "attacked.safety_rate"] == pytest.approx(0.6)
    assert trials.loc[key("krum", 0.3), "attacked.safety_rate"] == pytest.approx(0.25)
    assert trials.loc[key("krum", 0.3), "run_dir"] == str(run)
    assert trials.loc[key("krum", 0.3), "attacked.benign_nll"] == pytest.approx(1.5)
    assert (trials["status"] == "ok").sum() == 2
    md = (sweep / "report" / "sweep_summary.md").read_text()
    assert "| Krum | - | 25.0 n=1 |" in md


def test_report_runs_without_ray(tmp_path):
    """The whole report (run and sweep, with run-dir discovery) works with Ray unimportable."""
    run = make_run(tmp_path / "run", full=False)
    runs = tmp_path / "runs"
    sweep = make_sweep(runs / "sweeps" / "frac", seeds=(0,))
    found = runs / "frac" / "20250101-000000"
    found.mkdir(parents=True)
    (found / "resolved_config.yaml").write_text(yaml.safe_dump(
        {**CONFIG, "seed": 0, "attack": {"malicious_fraction": 0.1}}))
    write_json(found / "eval" / "attacked" / "metrics.json",
               metrics("attacked", 0.25, 0.1, -3.0, 0.0, 1.5))
    code = BLOCK_RAY.replace("importlib.import_module(sys.argv[1])", (
        "from pathlib import Path\nfrom ray_fedit.report import write_report\n"
        "write_report(Path(sys.argv[1])); write_report(Path(sys.argv[2]))\n"
        "assert 'ray' not in sys.modules"))
    res = subprocess.run([sys.executable, "-c", code, str(run), str(sweep)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "report" / "loss.png").is_file()
    assert "| FedAvg | 25.0 n=1 | - |" in (sweep / "report" / "sweep_summary.md").read_text()


def test_fallback_notes_name_the_rounds_and_reasons():
    """Round 2 of 3: the rule fell back; rounds 1 and 3: the update attack was not applied."""
    from ray_fedit.report import fallback_notes

    rounds = [{"round": 1, "update_attack": {"applied": False, "reason": "too few"}},
              {"round": 2, "aggregator_info": {"fallback": "trim floors to 0"},
               "update_attack": {"applied": True}},
              {"round": 3, "update_attack": {"applied": False, "reason": "too few"}}]
    notes = fallback_notes(rounds, "FedIT under attack")
    assert notes == [
        "FedIT under attack: in 2 of 3 rounds (1, 3) the update attack was not applied (too few); "
        "its attackers sent their trained updates.",
        "FedIT under attack: in 1 of 3 rounds (2) the aggregation rule fell back: trim floors to "
        "0.",
    ]
    assert fallback_notes([{"round": 1, "aggregator_info": {}}], "x") == []

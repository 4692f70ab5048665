"""The whole `ray-fedit run` pipeline on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ray_fedit.config import load_config
from ray_fedit.models.lora import load_adapter
from ray_fedit.pipeline import STAGES, run_pipeline
from tests.conftest import ROOT
from tests.tracker_files import mlflow_history, mlflow_run, tensorboard_scalars, wandb_offline


def test_all_stages_then_a_rerun_skips_them(ray_session, tmp_path, capsys, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(ROOT / "tests/assets/tiny_run.yaml", [
        f"output.root={tmp_path}", "output.trackers=[tensorboard,mlflow,wandb]"])
    summary = run_pipeline(cfg)
    run = Path(summary["run_dir"])

    assert sorted(p.stem for p in (run / "stages").glob("*.json")) == sorted(STAGES)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["malicious_ids"] == [3]  # 4 clients x 0.25, drawn with the run seed
    assert manifest["evaluation_disjointness"]["advbench"]["overlap_with_training"] == 0
    for stage in ("no_attack", "attacked", "defended"):
        metrics = json.loads((run / "eval" / stage / "metrics.json").read_text())
        rule = metrics["safety"]["advbench"]["judges"]["rule"]
        assert rule["n"] == 4 and 0.0 <= rule["rate"] <= 1.0
        assert set(summary["metrics"][stage]) >= {"safety_rate", "benign_refusal_rate", "benign_nll"}
    # two federations (attacked, no attack), each with its own rounds log and final adapter
    for root in (run, run / "no_attack"):
        rounds = [json.loads(line) for line in (root / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2]
        state, config = load_adapter(root / "checkpoints" / "final")
        assert config["r"] == 4 and state
    attacked_rounds = (run / "rounds.jsonl").read_text()
    assert '"malicious": true' in attacked_rounds
    assert '"malicious": true' not in (run / "no_attack" / "rounds.jsonl").read_text()
    # defense: 4 steps, saved every 2
    assert sorted(p.name for p in (run / "defense").glob("step_*")) == ["step_0002", "step_0004"]
    assert (run / "report" / "tables.md").is_file()
    # the terminal shows each round of both federations once, from their rounds.jsonl
    first = capsys.readouterr().out
    for label in ("attacked", "no_attack"):
        assert [ln.split(" | ")[0] for ln in first.splitlines() if f"  {label}: round" in ln] == \
            [f"  {label}: round 1/2", f"  {label}: round 2/2"]
    assert first.rstrip().splitlines()[-1] == f"report: {run / 'report' / 'report.html'}"
    assert (run / "logs" / "run.log").is_file()
    assert (run / "logs" / "ray").is_symlink() and (run / "logs" / "ray").is_dir()
    _check_trackers(run, summary)

    again = run_pipeline(cfg, run_dir=run, resume=True)
    out = capsys.readouterr().out
    assert out.count("already done; skipped") == len(STAGES)
    assert again["metrics"] == summary["metrics"]


def _check_trackers(run: Path, summary: dict) -> None:
    """Every backend holds the rounds of both federations, the headlines and the defense loss."""
    scalars = tensorboard_scalars(run / "tracking" / "tensorboard")
    run_mlflow, client = mlflow_run(run / "tracking" / "mlruns")
    history = wandb_offline(run / "tracking")["history"]
    for label, root in (("attacked", run), ("no_attack", run / "no_attack")):
        rounds = [json.loads(line) for line in (root / "rounds.jsonl").read_text().splitlines()]
        losses = [(r["round"], r["mean_loss"]) for r in rounds]
        key = f"federation/{label}/mean_loss"
        assert scalars[key] == [(s, float(np.float32(v))) for s, v in losses]
        assert mlflow_history(client, run_mlflow.info.run_id, key) == losses
        assert [(row["step"], row[key]) for row in history if key in row] == losses
    for stage, headline in summary["metrics"].items():
        key = f"eval/{stage}/safety_rate"
        assert mlflow_history(client, run_mlflow.info.run_id, key) == [(2, headline["safety_rate"])]
    defense = json.loads((run / "stages" / "defend.json").read_text())["outputs"]["losses"]
    assert len(defense) == 4
    assert mlflow_history(client, run_mlflow.info.run_id, "defense/loss") == list(
        enumerate(defense, start=1))
    assert "report/tables.md" in {a.path for a in client.list_artifacts(run_mlflow.info.run_id,
                                                                          "report")}

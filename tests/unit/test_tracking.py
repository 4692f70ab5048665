"""Experiment trackers: what is logged, and that each backend's own reader gets it back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ray_fedit import console, tracking
from ray_fedit.config import load_config
from ray_fedit.errors import ConfigError
from ray_fedit.tracking import Trackers, round_metrics
from tests.conftest import ROOT
from tests.tracker_files import (
    mlflow_history,
    mlflow_run,
    tensorboard_scalars,
    tensorboard_texts,
    wandb_offline,
)

RECORD = {"round": 2, "rounds": 3, "lr": 0.5, "sampled": [0, 1, 3], "aggregated": [0, 3],
          "rejected": [1], "failed": [], "retries": 1, "mean_loss": 2.25, "aggregate_norm": 0.125,
          "aggregator_info": {"f": 1, "kind": "krum", "flagged": True},
          "clients": [{"id": 0, "malicious": False, "weight": 0.25},
                      {"id": 3, "malicious": True, "weight": 0.75}],
          "eval": {"safety_rate": 0.5}, "bytes": 100, "seconds": 1.5, "update_attack": None}


def test_round_metrics_are_the_records_scalars():
    assert round_metrics(RECORD) == {
        "lr": 0.5, "retries": 1.0, "mean_loss": 2.25, "aggregate_norm": 0.125, "bytes": 100.0,
        "seconds": 1.5, "num_sampled": 3.0, "num_aggregated": 2.0, "num_rejected": 1.0,
        "num_failed": 0.0, "malicious_weight": 0.75, "aggregator/f": 1.0,
        "round_eval/safety_rate": 0.5}  # strings, booleans and None are not scalars


def test_flatten_nests_with_dots():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": "x"}) == \
        {"a.b": 1, "a.c.d": [1, 2], "e": {}, "f": "x"}


def test_a_missing_package_names_its_extra(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name == "mlflow" else real(name))
    tracking.check_available(["tensorboard"])
    with pytest.raises(ConfigError, match=r"'mlflow' needs the 'mlflow' package.*"
                                          r"pip install 'ray-fedit\[mlflow\]'"):
        tracking.check_available(["tensorboard", "mlflow"])


def test_the_config_names_known_trackers_once():
    cfg = load_config(ROOT / "tests/assets/tiny_run.yaml", ["output.trackers=[mlflow,wandb]"])
    assert cfg.output.trackers == ["mlflow", "wandb"]
    assert load_config(ROOT / "tests/assets/tiny_run.yaml").output.trackers == []
    with pytest.raises(ConfigError, match="output.trackers"):
        load_config(ROOT / "tests/assets/tiny_run.yaml", ["output.trackers=[neptune]"])
    with pytest.raises(ConfigError, match="lists a tracker twice"):
        load_config(ROOT / "tests/assets/tiny_run.yaml", ["output.trackers=[wandb,wandb]"])


def _rounds(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{**RECORD, "round": r, "rounds": n, "mean_loss": float(rng.random()),
             "aggregate_norm": float(rng.random())} for r in range(1, n + 1)]


@pytest.fixture
def offline(monkeypatch):
    """No remote tracker settings; what the trackers set in the environment is undone after."""
    for var in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_PROJECT", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(var, "")  # records the variable's state, restored at teardown
        monkeypatch.delenv(var)


def test_each_backend_reads_back_the_rounds_evaluations_and_report(tmp_path, offline):
    """The files written hold the values of rounds.jsonl, fed as RoundProgress shows them."""
    cfg = load_config(ROOT / "tests/assets/tiny_run.yaml")
    rounds = _rounds(3)
    rounds_file = tmp_path / "rounds.jsonl"
    rounds_file.write_text("".join(json.dumps(r) + "\n" for r in rounds))
    report = tmp_path / "report.md"
    report.write_text("| stage | safety |\n| --- | --- |\n| attacked | 50% |\n")
    root = tmp_path / "tracking"
    trackers = Trackers(["tensorboard", "mlflow", "wandb"], root, "study", "20261201-000000")
    trackers.log_config(cfg.model_dump(mode="json"), cfg.to_yaml())
    progress = console.RoundProgress(rounds_file, 3, label="attacked", stream=open("/dev/null", "w"),
                                     on_record=trackers.round_logger("attacked"))
    progress.close()
    # a judge that parsed nothing gives None: left out, and the backends stay
    trackers.log_metrics({"eval/attacked/safety_rate": 0.375, "eval/attacked/benign_nll": None}, 3)
    for step, loss in enumerate([1.5, 1.25], start=1):
        trackers.log_metrics({"defense/loss": loss}, step)
    trackers.log_artifacts([report, tmp_path / "missing.png"])  # a missing file is skipped
    assert set(trackers.backends) == {"tensorboard", "mlflow", "wandb"}
    trackers.close()

    losses = [(r["round"], r["mean_loss"]) for r in rounds]
    # TensorBoard stores float32
    scalars = tensorboard_scalars(root / "tensorboard")
    assert [(s, v) for s, v in scalars["federation/attacked/mean_loss"]] == \
        [(s, float(np.float32(v))) for s, v in losses]
    assert scalars["federation/attacked/malicious_weight"] == [(r, 0.75) for r in (1, 2, 3)]
    assert scalars["eval/attacked/safety_rate"] == [(3, 0.375)]
    assert "eval/attacked/benign_nll" not in scalars
    assert scalars["defense/loss"] == [(1, 1.5), (2, 1.25)]
    assert {"config/text_summary", "report/report.md/text_summary"} <= set(
        tensorboard_texts(root / "tensorboard"))

    run, client = mlflow_run(root / "mlruns")
    assert run.info.run_name == "20261201-000000" and run.info.status == "FINISHED"
    assert mlflow_history(client, run.info.run_id, "federation/attacked/mean_loss") == losses
    assert mlflow_history(client, run.info.run_id, "defense/loss") == [(1, 1.5), (2, 1.25)]
    assert run.data.params["seed"] == "0" and run.data.params["federation.rounds"] == "2"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/report.md"]

    wb = wandb_offline(root)
    history = [row for row in wb["history"] if "federation/attacked/mean_loss" in row]
    assert [(row["step"], row["federation/attacked/mean_loss"]) for row in history] == losses
    assert [row["defense/loss"] for row in wb["history"] if "defense/loss" in row] == [1.5, 1.25]
    assert wb["config"]["seed"] == 0 and wb["config"]["federation"]["rounds"] == 2
    assert [files for _, files in wb["artifacts"]] == [["report.md"]]


def test_a_failing_backend_is_dropped_not_fatal(tmp_path, offline, caplog, monkeypatch):
    import logging

    # an earlier CLI test may have stopped the project's records from reaching caplog
    monkeypatch.setattr(logging.getLogger("ray_fedit"), "propagate", True)
    trackers = Trackers(["tensorboard"], tmp_path, "study", "run")

    def boom(*args):
        raise OSError("disk full")

    trackers.backends["tensorboard"].log_metrics = boom
    trackers.log_metrics({"a": 1.0}, 1)  # no exception
    assert not trackers and "tracker tensorboard failed in log_metrics" in caplog.text
    trackers.log_metrics({"a": 2.0}, 2)  # and nothing to log to any more
    trackers.close()


def test_no_trackers_is_a_no_op(tmp_path):
    trackers = Trackers([], tmp_path / "tracking", "study", "run")
    assert not trackers and trackers.round_logger("attacked") is None
    trackers.log_metrics({"a": 1.0}, 1)
    trackers.close()
    assert not (tmp_path / "tracking").exists()


def test_sweeps_get_ray_tunes_own_callbacks(tmp_path, offline, monkeypatch):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    callbacks = tracking.tune_callbacks(["tensorboard", "mlflow", "wandb"], tmp_path, "grid")
    # Tune's automatic TBXLoggerCallback writes the event files: no second one
    assert [type(c) for c in callbacks] == [MLflowLoggerCallback, WandbLoggerCallback]
    assert callbacks[0].tracking_uri == (tmp_path / "mlruns").resolve().as_uri()
    assert callbacks[0].experiment_name == "grid"
    assert callbacks[1].project == "ray-fedit" and callbacks[1].kwargs["mode"] == "offline"
    assert callbacks[1].kwargs["settings"].silent
    assert tracking.tune_callbacks([], tmp_path, "grid") == []
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    assert [type(c) for c in tracking.tune_callbacks(["tensorboard"], tmp_path, "grid")] == \
        [TBXLoggerCallback]


def test_run_refuses_a_missing_tracker_before_the_run_directory(tmp_path, monkeypatch):
    from ray_fedit.pipeline import run_pipeline

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    cfg = load_config(ROOT / "tests/assets/tiny_run.yaml",
                      [f"output.root={tmp_path}", "output.trackers=[wandb]"])
    with pytest.raises(ConfigError, match=r"ray-fedit\[wandb\]"):
        run_pipeline(cfg)
    assert not any(Path(tmp_path).iterdir())


def test_a_backend_that_cannot_start_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://host")
    with pytest.raises(ConfigError, match=r"output.trackers: 'mlflow' could not start"):
        Trackers(["tensorboard", "mlflow"], tmp_path, "study", "run")

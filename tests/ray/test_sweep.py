"""A resumable Ray Tune sweep over tiny runs: interrupt it (Ctrl-C between trials, SIGKILL in the
middle of two concurrent trials), resume it, and check that finished trials are not run again and
unfinished ones continue their run directories from their last federation checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import ROOT


def _last_results(sweep_dir: Path) -> dict[str, dict]:
    """Last reported result of each trial that reported one, by trial key."""
    out = {}
    for path in sweep_dir.glob("_trainable_*/result.json"):
        lines = path.read_text().strip().splitlines()
        if lines:
            last = json.loads(lines[-1])
            out[last["trial_key"]] = last
    return out


def _results(sweep_dir: Path) -> dict[str, dict]:
    """Last reported result of each finished trial (a trial first reports only its run directory,
    as its checkpoint), by trial key."""
    return {k: r for k, r in _last_results(sweep_dir).items() if "attacked.safety_rate" in r}


def _trial_dirs(sweep_dir: Path) -> list[str]:
    return sorted(_results(sweep_dir))


def test_sweep_2x2_resumes_after_interruption(tmp_path):
    """Interrupt a 4-trial sweep after its first trial finishes, resume it, and check that every
    trial has a result and the finished one was not run again."""
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if k not in ("MLFLOW_TRACKING_URI", "WANDB_MODE")}
    cmd = [sys.executable, "-m", "ray_fedit", "sweep", str(ROOT / "tests/assets/tiny_sweep.yaml"),
           f"output.root={tmp_path}", "output.trackers=[tensorboard,mlflow]"]
    sweep_dir = tmp_path / "sweeps" / "tiny_sweep"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not _trial_dirs(sweep_dir) and proc.poll() is None:
        time.sleep(2)
    assert _trial_dirs(sweep_dir), (tmp_path / "first.log").read_text()[-3000:]
    finished_before = _results(sweep_dir)
    os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C: Tune saves its state and stops
    proc.wait(timeout=120)

    res = subprocess.run([*cmd, "--resume", str(sweep_dir)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    after = _results(sweep_dir)
    assert sorted(after) == sorted(f"aggregator.name={a},defense.name={d}"
                                   for a in ("mean", "median") for d in ("none", "posthoc"))
    for key, result in after.items():  # the defended trials ran the defense inside their trial
        assert ("defended.safety_rate" in result) == key.endswith("posthoc"), (key, sorted(result))
    for key, result in finished_before.items():  # finished trials were not run again
        assert after[key]["run_dir"] == result["run_dir"]
    assert len({r["run_dir"] for r in after.values()}) == 4
    assert (sweep_dir / "sweep_results.csv").is_file()
    _check_tune_trackers(tmp_path / "sweeps", sweep_dir, after)


def _check_tune_trackers(storage: Path, sweep_dir: Path, results: dict[str, dict]) -> None:
    """Ray Tune's own MLflow callback logged every finished trial's result, across the resume
    too: one MLflow run per trial whose last value of each headline is the trial's reported one.
    (TensorBoard event files Tune writes into every trial's directory by default.)"""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.7+ asks, to read it too
    client = MlflowClient(tracking_uri=(storage / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny_sweep")
    logged: dict[str, dict[str, float]] = {}  # trial name -> last metrics
    for run in client.search_runs([experiment.experiment_id]):
        logged.setdefault(run.data.tags["trial_name"], {}).update(run.data.metrics)
    for key, result in results.items():
        runs = [m for name, m in logged.items() if name.endswith(result["trial_id"])]
        assert [m.get("attacked.safety_rate") for m in runs] == [result["attacked.safety_rate"]], \
            (key, logged)
    # each trial's own run logged its rounds in its run directory
    for result in results.values():
        assert any((Path(result["run_dir"]) / "tracking" / "mlruns").rglob("mean_loss"))


MID_FEDERATION_SWEEP = """\
name: mid_federation
base: {base}
overrides:
  - federation.rounds=3
  - attack.compare_no_attack=false
  - defense.name=none
  - evaluation.num_benign_prompts=2
  - "evaluation.benchmarks=[{{name: advbench, num_prompts: 2}}]"
grid:
  aggregator.name: [mean, median]
seeds: [0]
max_concurrent_trials: 2
"""


def _complete_lines(path: Path) -> list[dict]:
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def test_sigkilled_concurrent_trials_resume_from_their_federation_checkpoints(ray_session, tmp_path):
    """Two trials run at once (max_concurrent_trials: 2). SIGKILL the sweep's process group (a lost
    head: nothing gets saved on the way out) as soon as one trial has logged round 1 of 3, then
    resume. Each trial keeps its own run directory; the interrupted one continues from its
    checkpoint (the rounds logged before the kill are kept, wall-clock seconds and all, so they did
    not run again) and ends with the bitwise same adapter as an uninterrupted run of its config."""
    from ray_fedit.config import load_config
    from ray_fedit.pipeline import run_pipeline

    sweep_file = tmp_path / "mid_federation.yaml"
    sweep_file.write_text(MID_FEDERATION_SWEEP.format(base=ROOT / "tests/assets/tiny_run.yaml"))
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ray_fedit", "sweep", str(sweep_file), f"output.root={tmp_path}"]
    runs, sweep_dir = tmp_path / "mid_federation", tmp_path / "sweeps" / "mid_federation"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline, hit = time.time() + 600, None
    while hit is None and time.time() < deadline and proc.poll() is None:
        hit = next((d for d in runs.glob("*") if _complete_lines(d / "rounds.jsonl")), None)
        time.sleep(0.05)
    assert hit is not None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    before = _complete_lines(hit / "rounds.jsonl")
    assert len(before) < 3 and not (hit / "stages" / "federate.json").exists(), \
        f"the federation of {hit} finished before the kill; the test needs it mid-federation"
    dirs = sorted(runs.iterdir())
    assert len(dirs) == 2, dirs  # both trials had started, each in its own directory

    res = subprocess.run([*cmd, "--resume", str(sweep_dir)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    after = _results(sweep_dir)
    assert sorted(after) == ["aggregator.name=mean", "aggregator.name=median"]
    assert sorted(runs.iterdir()) == dirs  # no trial started anew
    assert sorted(Path(r["run_dir"]) for r in after.values()) == dirs
    assert f"resuming {hit}" in out and "continuing at round" in out, out[-3000:]
    rounds = _complete_lines(hit / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3] and rounds[: len(before)] == before

    cfg = load_config(hit / "resolved_config.yaml", [f"output.root={tmp_path / 'reference'}"])
    reference = Path(run_pipeline(cfg, stages=["prepare", "federate"])["run_dir"])
    resumed = load_file(hit / "checkpoints" / "final" / "adapter_model.safetensors")
    expected = load_file(reference / "checkpoints" / "final" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)

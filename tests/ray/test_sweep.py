"""A resumable Ray Tune sweep over tiny runs: interrupt it like Ctrl-C, resume it, and check that
finished trials are not run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.glob("_trainable_*") if (p / "result.json").is_file()
                  and (p / "result.json").read_text().strip())


def _results(sweep_dir: Path) -> dict[str, dict]:
    """Last reported result of each finished trial, by trial key."""
    out = {}
    for d in _trial_dirs(sweep_dir):
        last = json.loads((d / "result.json").read_text().strip().splitlines()[-1])
        out[last["trial_key"]] = last
    return out


def test_sweep_2x2_resumes_after_interruption(tmp_path):
    """Interrupt a 4-trial sweep after its first trial finishes, resume it, and check that every
    trial has a result and the finished one was not run again."""
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ray_fedit", "sweep", str(ROOT / "tests/assets/tiny_sweep.yaml"),
           f"output.root={tmp_path}"]
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

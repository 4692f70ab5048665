"""``ray-fedit evaluate`` writes to a fresh directory, refuses a non-empty ``--out`` unless told to
overwrite it, says where the results went, and ``--resume DIR`` judges DIR's saved responses.

The engine is a fake that counts its calls (``engine_calls`` in conftest.py), and Ray is never
started:
``ensure_ray`` is replaced, and no benign record has a reference response (no NLL task).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from ray_fedit.config import load_config
from ray_fedit.data.schema import make_record
from ray_fedit.errors import ConfigError
from tests.conftest import ROOT

PROBE = ("import sys; from ray_fedit.cli import main; rc = main(sys.argv[1:]); "
         "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")


@pytest.fixture
def no_ray(monkeypatch):
    import ray_fedit.pipeline as pipeline

    heldout_calls: list[int] = []

    def heldout(cfg):
        heldout_calls.append(1)
        return [make_record(f"Say hello ({i}).", source="seed_heldout") for i in range(2)]

    monkeypatch.setattr(pipeline, "ensure_ray", lambda stages=(): None)
    monkeypatch.setattr(pipeline, "_heldout_benign", heldout)
    return heldout_calls


def _cfg(root):
    return load_config(None, [
        "model.name=tiny-random-llama", "defense.name=none", f"output.root={root}",
        "evaluation.benchmarks=[{name: advbench, num_prompts: 2}]", "evaluation.judges=[rule]",
        "evaluation.num_benign_prompts=2", "evaluation.bootstrap_samples=50"])


def test_each_evaluation_gets_a_fresh_directory_and_says_where(tmp_path, no_ray, engine_calls,
                                                                capsys):
    from ray_fedit.pipeline import evaluate_command

    cfg = _cfg(tmp_path)
    first = evaluate_command(cfg, adapter=None, out=None)
    second = evaluate_command(cfg, adapter=None, out=None)
    out = capsys.readouterr().out
    assert first != second and first.parent == second.parent == tmp_path / "eval" / "base"
    for d in (first, second):
        assert (d / "metrics.json").is_file() and f"evaluation directory: {d}" in out
        assert f"written to {d}" in out
    assert engine_calls == [4, 4]


def test_a_non_empty_out_directory_needs_overwrite(tmp_path, no_ray, engine_calls):
    from ray_fedit.pipeline import evaluate_command

    cfg, out = _cfg(tmp_path), tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=rf"--out {out} exists and is not empty; pass --overwrite"):
        evaluate_command(cfg, adapter=None, out=str(out))
    assert engine_calls == [] and no_ray == []
    assert evaluate_command(cfg, adapter=None, out=str(out), overwrite=True) == out
    assert (out / "metrics.json").is_file() and (out / "notes.txt").read_text() == "keep me"
    # an empty or missing directory needs no --overwrite
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "empty", tmp_path / "new" / "dir"):
        assert evaluate_command(cfg, adapter=None, out=str(d)) == d


def test_resume_judges_the_saved_responses_without_the_engine(tmp_path, no_ray, engine_calls,
                                                              flaky_judge, capsys):
    """The held-out benign records (the base model's answers when evaluation.benign is unset)
    are saved too, so a resumed evaluation calls no engine at all."""
    from ray_fedit.pipeline import evaluate_command

    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError, match="is down"):
        evaluate_command(cfg, adapter=None, out=None)
    (failed,) = (tmp_path / "eval" / "base").iterdir()
    assert f"evaluation directory: {failed}" in capsys.readouterr().out
    assert engine_calls == [4] and no_ray == [1]

    assert evaluate_command(cfg, adapter=None, out=None, resume=str(failed)) == failed
    assert engine_calls == [4] and no_ray == [1]
    assert (failed / "metrics.json").is_file()
    with pytest.raises(ConfigError, match="no responses.parquet"):
        evaluate_command(cfg, adapter=None, out=None, resume=str(tmp_path / "eval"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_refuses_a_non_empty_out_and_conflicting_flags_before_ray(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    for args, says in [
        (("--out", str(out)), f"--out {out} exists and is not empty"),
        (("--resume", str(out), "--out", str(tmp_path / "x")), "--resume DIR continues DIR"),
    ]:
        res = _cli("evaluate", "configs/quickstart.yaml", *args)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ray-fedit: config error: {says}")
        assert res.stdout.strip() == "NO_RAY"

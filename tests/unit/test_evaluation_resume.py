"""Evaluation writes its responses before any judge runs, so a failing judge loses no generation,
and a rerun with ``resume`` judges the saved responses without calling the engine.

The engine is a fake (no Ray, no model; ``engine_calls`` in conftest.py) and the benign records
have no reference response, so no Ray task runs.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from ray_fedit.config import load_config
from ray_fedit.data.schema import make_record
from ray_fedit.errors import CheckpointError
from ray_fedit.evaluation import evaluate_adapter
from ray_fedit.evaluation.runner import RESPONSES_FILE

BENIGN = [make_record(f"Name a colour, please ({i}).", source="held_out") for i in range(2)]


def _cfg(*extra: str):
    return load_config(None, [
        "model.name=tiny-random-llama", "defense.name=none", "seed=3",
        "evaluation.benchmarks=[{name: advbench, num_prompts: 3}]", "evaluation.judges=[rule]",
        "evaluation.num_benign_prompts=2", "evaluation.bootstrap_samples=50", *extra])


def _comparable(metrics):
    return {k: v for k, v in metrics.items() if k not in ("timing_s", "responses_reused")}


def test_a_failing_judge_keeps_the_responses_and_a_resumed_run_only_judges(
        tmp_path, engine_calls, flaky_judge):
    cfg = _cfg()
    with pytest.raises(RuntimeError, match="judge rule is down"):
        evaluate_adapter(cfg, stage="global", adapter_dir=None, out_dir=tmp_path / "a",
                         benign_records=BENIGN)
    assert engine_calls == [3 + 2]  # the 3 AdvBench and 2 benign prompts, in one pass
    saved = pq.read_table(tmp_path / "a" / RESPONSES_FILE).to_pylist()
    assert [r["set"] for r in saved] == ["advbench"] * 3 + ["benign"] * 2
    assert [r["response"] for r in saved][:2] == ["I cannot help with that.", "Sure: 1"]
    assert not (tmp_path / "a" / "metrics.json").exists()

    resumed = evaluate_adapter(cfg, stage="global", adapter_dir=None, out_dir=tmp_path / "a",
                               benign_records=BENIGN, resume=True)
    assert engine_calls == [5]  # no second engine call
    assert resumed["responses_reused"] is True

    # an uninterrupted run, elsewhere, with the judge working from the start
    reference = evaluate_adapter(cfg, stage="global", adapter_dir=None, out_dir=tmp_path / "b",
                                 benign_records=BENIGN)
    assert engine_calls == [5, 5] and reference["responses_reused"] is False
    assert _comparable(resumed) == _comparable(reference)
    # rule: responses 0 and 2 of 3 are refusals -> harmless rate 2/3
    assert resumed["safety"]["advbench"]["judges"]["rule"]["rate"] == pytest.approx(2 / 3)
    for name in ("advbench.parquet", "benign.parquet"):
        assert (pq.read_table(tmp_path / "a" / name).to_pylist()
                == pq.read_table(tmp_path / "b" / name).to_pylist())
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["responses_reused"] is True


def test_resume_refuses_responses_of_another_generation_setup(tmp_path, engine_calls):
    evaluate_adapter(_cfg(), stage="global", adapter_dir=None, out_dir=tmp_path,
                     benign_records=BENIGN)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / RESPONSES_FILE} holds responses of "
                                              r"another model, generation setup, seed or adapter"):
        evaluate_adapter(_cfg("generation.max_new_tokens=9"), stage="global", adapter_dir=None,
                         out_dir=tmp_path, benign_records=BENIGN, resume=True)
    with pytest.raises(CheckpointError, match=r"holds responses to other prompts \(5 saved, 4 "
                                              r"now; first difference at row 4"):
        evaluate_adapter(_cfg(), stage="global", adapter_dir=None, out_dir=tmp_path,
                         benign_records=BENIGN[:1], resume=True)
    assert engine_calls == [5]


def test_without_resume_the_responses_are_generated_again(tmp_path, engine_calls):
    for _ in range(2):
        metrics = evaluate_adapter(_cfg(), stage="global", adapter_dir=None, out_dir=tmp_path,
                                   benign_records=BENIGN)
    assert engine_calls == [5, 5] and metrics["responses_reused"] is False


def test_the_evaluate_stage_reuses_the_responses_of_its_failed_attempt(
        tmp_path, engine_calls, flaky_judge):
    """A rerun of the pipeline's evaluate stage (``ray-fedit run --resume``) judges without
    generating."""
    from ray_fedit.pipeline import _evaluate, _save_records
    from ray_fedit.rundir import RunDir

    run = RunDir(tmp_path)
    _save_records(run.data / "benign_eval.parquet", BENIGN)
    cfg = _cfg()
    with pytest.raises(RuntimeError, match="is down"):
        _evaluate(cfg, run, {"attacked": None})
    out = _evaluate(cfg, run, {"attacked": None})
    assert engine_calls == [5]
    assert json.loads((run.eval("attacked") / "metrics.json").read_text())["responses_reused"]
    assert out == {"metrics": {"attacked": str(run.eval("attacked") / "metrics.json")}}

"""Judge summaries (the rule judge in evaluation), the every-N-rounds hook, the rule-judge
validation against human labels, and Ray-free imports of the evaluation modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ray_fedit.evaluation.runner import RoundEvaluator, summarize_judge
from ray_fedit.evaluation.validate_judges import agreement, load_refusal_labels, validate_rule
from ray_fedit.judges.rule import is_refusal
from ray_fedit.registry import JUDGES
from tests.conftest import ROOT

# Imports the module named in argv[1] with every ray import failing.
BLOCK_RAY = """
import importlib, sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked in this test")
sys.meta_path.insert(0, _Block())
importlib.import_module(sys.argv[1])
"""

KW = {"samples": 200, "confidence": 0.95, "seed": 0}


def test_rule_judge_rows_summarise_to_a_harmless_rate_per_category():
    """Responses: 2 refusals of 3 in cat a, 0 of 1 in cat b -> overall 2/4, a 2/3, b 0/1."""
    rule = JUDGES.get("rule")
    rows = rule(["q"] * 4, ["I'm sorry, I can't.", "Sure, step 1: ...", "I cannot help.",
                            "Here you go: ..."])
    out = summarize_judge(rows, ["a", "a", "a", "b"], **KW)
    assert out["rate"] == 0.5 and out["n"] == 4 and out["n_true"] == 2 and out["unparseable"] == 0
    assert out["per_category"]["a"]["rate"] == pytest.approx(2 / 3)
    assert out["per_category"]["b"]["rate"] == 0.0
    assert (out["per_category"]["b"]["ci_low"], out["per_category"]["b"]["ci_high"]) == (0.0, 0.0)
    assert "score" not in out  # the rule judge has no score


def test_scores_and_unparseable_verdicts_are_summarised_separately():
    """safe: T, None, F; score: 0, None, 0.5 -> rate 1/3 (None is not safe), mean 0.25 over 2."""
    rows = [{"safe": True, "score": 0.0}, {"safe": None, "score": None},
            {"safe": False, "score": 0.5}]
    out = summarize_judge(rows, ["x", "x", "x"], **KW)
    assert out["rate"] == pytest.approx(1 / 3) and out["unparseable"] == 1
    assert out["score"]["mean"] == 0.25 and out["score"]["n"] == 2
    assert out["score"]["unparseable"] == 1
    reward_only = summarize_judge([{"score": 1.0}, {"score": 3.0}], ["x", "y"], **KW)
    assert "rate" not in reward_only and reward_only["score"]["mean"] == 2.0
    assert reward_only["per_category"]["y"]["score"]["mean"] == 3.0


def test_round_evaluator_runs_every_n_rounds_only(tmp_path, tiny_config):
    calls = []

    def fake(cfg, *, stage, adapter_dir, out_dir, benign_records):
        calls.append((stage, Path(adapter_dir), out_dir, benign_records))
        return {"stage": stage}

    hook = RoundEvaluator(tiny_config, tmp_path / "eval", every=2, evaluate=fake,
                          benign_records=["b"])
    results = [hook(r, tmp_path / f"ckpt{r}") for r in range(1, 6)]
    assert results == [None, {"stage": "round_0002"}, None, {"stage": "round_0004"}, None]
    assert calls[0] == ("round_0002", tmp_path / "ckpt2", tmp_path / "eval" / "round_0002", ["b"])
    assert not RoundEvaluator(tiny_config, tmp_path, every=0, evaluate=fake).due(4)


def test_round_evaluator_saves_an_adapter_state_first(tmp_path, tiny_config):
    """A state dict is written as a PEFT adapter directory that the evaluation can load."""
    from ray_fedit.models.lora import load_adapter

    seen = {}

    def fake(cfg, *, stage, adapter_dir, out_dir, benign_records):
        seen["state"], seen["config"] = load_adapter(adapter_dir)
        return {}

    state = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 4)}
    RoundEvaluator(tiny_config, tmp_path, every=1, evaluate=fake)(1, state)
    assert torch.equal(seen["state"]["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       torch.ones(2, 4))
    assert seen["config"]["r"] == tiny_config.lora.r


def test_generation_makes_one_engine_pass_per_temperature(tiny_config, monkeypatch):
    """Jobs at the config's temperature (0) and at 0.0 share a pass; 0.7 and 0.1 get their own."""
    from ray_fedit.evaluation.runner import _generate_all
    from ray_fedit.generation import engine

    passes = []

    def fake_generate(rows, *, sampling, **kw):
        passes.append((sampling.temperature, [r["prompt"] for r in rows]))
        return [{**r, "response": f"{r['prompt']}@{sampling.temperature}"} for r in rows]

    monkeypatch.setattr(engine, "generate", fake_generate)
    jobs = [("a", None), ("b", 0.7), ("c", 0.0), ("d", 0.1), ("e", 0.7)]
    out = _generate_all(tiny_config, None, jobs)
    assert [o["response"] for o in out] == ["a@0.0", "b@0.7", "c@0.0", "d@0.1", "e@0.7"]
    assert sorted(passes) == [(0.0, ["a", "c"]), (0.1, ["d"]), (0.7, ["b", "e"])]


def test_agreement_by_hand():
    """pred T T F F T, truth T F F T T -> tp 2, fp 1, fn 1, tn 1; acc 3/5; kappa by hand.

    Chance = P(pred T) P(true T) + P(pred F) P(true F) = 3/5 * 3/5 + 2/5 * 2/5 = 13/25;
    kappa = (3/5 - 13/25) / (1 - 13/25) = (2/25) / (12/25) = 1/6.
    """
    a = agreement([True, True, False, False, True], [True, False, False, True, True])
    assert a["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 1}
    assert a["accuracy"] == pytest.approx(0.6) and a["cohen_kappa"] == pytest.approx(1 / 6)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)


def test_rule_validation_on_pyrit_human_labels():
    """105 rows, 70 labelled refusals (human_score 1); the confusion matrix is the rule's own."""
    rows = load_refusal_labels()
    assert len(rows) == 105 and sum(r["refusal"] for r in rows) == 70
    res = validate_rule()
    c = res["confusion"]
    assert c["tp"] + c["fn"] == 70 and c["fp"] + c["tn"] == 35
    predicted = [is_refusal(r["response"]) for r in rows]
    assert c["tp"] == sum(p and r["refusal"] for p, r in zip(predicted, rows, strict=True))
    assert res["accuracy"] == pytest.approx((c["tp"] + c["tn"]) / 105)
    assert len(res["disagreements"]) == c["fp"] + c["fn"]
    # the compliance check: the objective-achieved answers the rule reads as refusals
    from ray_fedit.evaluation.validate_judges import load_compliance_rows

    complied = load_compliance_rows()
    wrong = sum(is_refusal(r["response"]) for r in complied)
    assert res["compliance"] == {"n": 191, "read_as_refusal": wrong,
                                 "specificity": (191 - wrong) / 191}
    assert wrong == 19  # docs/evaluation.md: 172 of 191 read as not refused


def test_validation_cli_prints_the_confusion_matrix():
    res = subprocess.run([sys.executable, "-m", "ray_fedit.evaluation.validate_judges",
                          "--judge", "rule"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "n=105" in res.stdout and "rule refusal" in res.stdout and "accuracy" in res.stdout
    assert "191 human-labelled compliant answers" in res.stdout


@pytest.mark.parametrize("module", ["ray_fedit.evaluation", "ray_fedit.evaluation.stats",
                                    "ray_fedit.evaluation.benchmarks", "ray_fedit.judges",
                                    "ray_fedit.judges.mt_bench"])
def test_evaluation_and_judges_import_without_ray(module):
    res = subprocess.run([sys.executable, "-c", BLOCK_RAY, module], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_mt_bench_questions_from_fastchat_jsonl(tmp_path):
    from ray_fedit.config import DataSourceConfig
    from ray_fedit.errors import DataError
    from ray_fedit.evaluation.helpfulness import load_mt_bench

    path = tmp_path / "question.jsonl"
    path.write_text(
        '{"question_id": 81, "category": "writing", "turns": ["Write a blog post.", "Rewrite."]}\n'
        '\n'
        '{"question_id": 111, "category": "math", "turns": ["2+2?", "3+3?"], '
        '"reference": ["4", "6"]}\n')
    src = DataSourceConfig(kind="jsonl", path=str(path), instruction_field="turns")
    rows = load_mt_bench(src)
    assert rows == [
        {"question_id": 81, "category": "writing", "instruction": "Write a blog post.",
         "reference": None},
        {"question_id": 111, "category": "math", "instruction": "2+2?", "reference": "4"},
    ]
    path.write_text('{"question_id": 1, "turns": []}\n')
    with pytest.raises(DataError, match=r"question.jsonl:1: field 'turns'"):
        load_mt_bench(src)
    path.write_text('{"question_id": 1,\n')
    with pytest.raises(DataError, match="not valid JSON"):
        load_mt_bench(src)


def test_response_nll_is_per_example_and_batch_invariant(tiny_config):
    """Padding is masked, so batching cannot change an example's NLL; an example whose prompt
    fills max_seq_len has no response token and gets None."""
    from ray_fedit.evaluation.helpfulness import response_nll

    pairs = [("Say hi.", "Hi there!"), ("Count to three, slowly please.", "One, two, three."),
             ("x " * 200, "too late")]
    kw = {"template": "chat", "max_seq_len": 64}
    one = response_nll(tiny_config.model, None, pairs, batch_size=1, **kw)
    three = response_nll(tiny_config.model, None, pairs, batch_size=3, **kw)
    assert one[2] is None and three[2] is None
    assert three[:2] == pytest.approx(one[:2], abs=1e-4)
    assert all(v > 0 for v in one[:2]) and one[0] != one[1]

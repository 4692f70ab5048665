"""The bundled SmolLM2 evaluated on 8 AdvBench prompts with the rule judge (real model, real text).

SmolLM2-135M-Instruct is not safety-aligned (ENVIRONMENT.md), so the harmless rate is whatever it
is; the test checks the evaluation's bookkeeping on real text: responses are non-empty, the rule
verdicts in the parquet are the rule applied to those responses, and the metrics agree with them.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from ray_fedit.config import load_config
from ray_fedit.judges.rule import is_refusal


def test_smollm2_advbench_rule_judge(ray_session, tmp_path):
    cfg = load_config(None, [
        "model.name=smollm2-135m-instruct", "defense.name=none",
        "evaluation.benchmarks=[{name: advbench, num_prompts: 8, append_period: true}]",
        "evaluation.judges=[rule]", "evaluation.bootstrap_samples=500",
        "generation.max_new_tokens=32", "generation.batch_size=8", "generation.torch_threads=2",
    ])
    from ray_fedit.evaluation import evaluate_adapter

    metrics = evaluate_adapter(cfg, stage="base", adapter_dir=None, out_dir=tmp_path)

    rows = pq.read_table(tmp_path / "advbench.parquet").to_pylist()
    assert len(rows) == 8 and all(r["prompt"].endswith(".") for r in rows)
    assert all(r["response"].strip() for r in rows)  # a real model answers
    assert [r["rule_safe"] for r in rows] == [is_refusal(r["response"]) for r in rows]
    rule = metrics["safety"]["advbench"]["judges"]["rule"]
    assert rule["n"] == 8 and rule["rate"] == sum(r["rule_safe"] for r in rows) / 8
    assert rule["ci_low"] <= rule["rate"] <= rule["ci_high"]
    assert sum(c["n"] for c in rule["per_category"].values()) == 8
    assert json.loads((tmp_path / "metrics.json").read_text())["safety"]["advbench"]["n"] == 8

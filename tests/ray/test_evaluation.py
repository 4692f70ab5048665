"""End-to-end evaluation of an adapter on the tiny random model, on the shared local Ray.

One ``evaluate_adapter`` call covers every path: 3 AdvBench prompts generated with the hf engine
and a LoRA adapter; the rule judge, the reward model (a tiny random classifier built here), the
judge model engine path (the tiny random model, whose outputs are unparseable), and the HTTP LLM
judge; the benign over-refusal rate and response NLL; and MT-1 against a local judge server
(127.0.0.1 only). A rerun with ``resume`` then judges the saved responses without an engine pass.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
import torch

from ray_fedit.config import load_config
from ray_fedit.data.schema import make_record
from ray_fedit.judges.rule import is_refusal
from tests.unit.test_judges_reward_model import build_tiny_reward_model

RUBRIC = "#overall_reasoning r\n#scores\n1.a r\n1.b 0\n2.a r\n2.b 3\n3.a r\n3.b 5\n"


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge: MT-Bench grading gets [[7]], anything else the rubric above."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        is_mt_bench = body["messages"][0]["content"] == "You are a helpful assistant."
        text = "Fine answer. Rating: [[7]]" if is_mt_bench else RUBRIC
        payload = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _tiny_adapter(cfg, directory):
    """A LoRA adapter on the tiny model with non-zero B matrices, so it changes the outputs."""
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, save_adapter, wrap_lora

    model, _ = load_model_and_tokenizer(cfg.model)
    peft_model = wrap_lora(model, cfg.lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return save_adapter(adapter_state(peft_model), cfg.lora, directory, base_model=cfg.model.name)


def _nll(cfg, adapter_dir, instruction, response):
    """An independent response NLL: PEFT (unmerged) + the model's own loss on one example."""
    from peft import PeftModel

    from ray_fedit.federation.sft import tokenize_example
    from ray_fedit.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(cfg.model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ex = tokenize_example(tok, instruction, response, template=cfg.data.template,
                          max_seq_len=cfg.data.max_seq_len)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
    return float(out.loss)


def test_evaluate_adapter_end_to_end(ray_session, tmp_path, judge_url, monkeypatch):
    rm = build_tiny_reward_model(tmp_path / "rm")
    questions = tmp_path / "question.jsonl"
    # "extraction" is answered greedily (FastChat's temperature 0), like the benchmarks here, so
    # the whole evaluation is one engine pass.
    questions.write_text("".join(json.dumps({"question_id": 131 + i, "category": "extraction",
                                             "turns": [f"List the nouns in: {w}.", "Sort them."]})
                                 + "\n" for i, w in enumerate(["the rain", "a cold snow"])))
    cfg = load_config(None, [
        "model.name=tiny-random-llama", "defense.name=none", "seed=3",
        "evaluation.benchmarks=[{name: advbench, num_prompts: 3, append_period: true}]",
        "evaluation.judges=[rule,reward_model,judge_model,llm_judge_http,probe]",
        "evaluation.probe_model=tiny-random-llama",
        f"evaluation.reward_model={rm}", "evaluation.judge_model=tiny-random-llama",
        "evaluation.judge_max_new_tokens=4", "evaluation.bootstrap_samples=200",
        "evaluation.num_benign_prompts=3",
        f"evaluation.llm_judge={{base_url: '{judge_url}', model: judge, backoff_s: 0.01}}",
        f"evaluation.mt_bench={{kind: jsonl, path: '{questions}', instruction_field: turns}}",
        "generation.max_new_tokens=8", "generation.batch_size=4", "generation.torch_threads=1",
    ])
    adapter = _tiny_adapter(cfg, tmp_path / "adapter")
    benign = [make_record(f"Name color number {i}.", f"Color {i} is blue.", source="held_out")
              for i in range(4)]
    from ray_fedit.evaluation import evaluate_adapter
    from ray_fedit.generation import engine

    passes = []
    real_generate = engine.generate

    def counting_generate(rows, **kw):
        passes.append(len(rows))
        return real_generate(rows, **kw)

    monkeypatch.setattr(engine, "generate", counting_generate)
    out_dir = tmp_path / "eval" / "global"
    metrics = evaluate_adapter(cfg, stage="global", adapter_dir=adapter, out_dir=out_dir,
                               benign_records=benign)

    assert passes == [3 + 3 + 2]  # AdvBench, benign and MT-Bench prompts in one engine pass
    # metrics.json is what the call returned
    assert json.loads((out_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["stage"] == "global" and metrics["adapter_dir"] == str(adapter)

    # per-prompt rows: 3 AdvBench prompts with the paper's period, every judge's columns
    rows = pq.read_table(out_dir / "advbench.parquet").to_pylist()
    assert len(rows) == 3 and all(r["prompt"].endswith(".") for r in rows)
    assert [r["rule_safe"] for r in rows] == [is_refusal(r["response"]) for r in rows]
    assert all(r["judge_model_safe"] is None for r in rows)  # random tiny judge: unparseable
    assert all(r["llm_judge_http_score"] == 0.75 for r in rows)  # (3 + 5 - 2) / 8

    adv = metrics["safety"]["advbench"]
    assert adv["n"] == 3 and adv["available"] == 520 and adv["seed"] == 3
    judges = adv["judges"]
    rule = judges["rule"]
    assert rule["n"] == 3 and rule["rate"] == sum(r["rule_safe"] for r in rows) / 3
    assert rule["ci_low"] <= rule["rate"] <= rule["ci_high"]
    assert set(rule["per_category"]) == {r["category"] for r in rows}
    rm_scores = [r["reward_model_score"] for r in rows]
    assert judges["reward_model"]["score"]["mean"] == pytest.approx(sum(rm_scores) / 3)
    assert "rate" not in judges["reward_model"]
    jm = judges["judge_model"]
    assert jm["unparseable"] == 3 and jm["rate"] == 0.0 and jm["n_true"] == 0
    assert judges["llm_judge_http"]["rate"] == 0.0
    assert judges["llm_judge_http"]["score"]["mean"] == pytest.approx(0.75)
    # the probe judge (fit on the tiny model's features): a verdict and its probability per row
    assert [r["probe_safe"] for r in rows] == [r["probe_refusal_prob"] > 0.5 for r in rows]
    assert judges["probe"]["rate"] == sum(r["probe_safe"] for r in rows) / 3
    agree = adv["agreement"]["rule|probe"]
    assert agree["n"] == 3 and agree["agree"] == sum(
        r["rule_safe"] == r["probe_safe"] for r in rows) / 3
    assert "rule|reward_model" not in adv["agreement"]  # a scoring judge has no verdicts
    assert adv["diversity"]["n"] == 3 and adv["diversity"]["distinct"] == len(
        {" ".join(r["response"].split()).lower() for r in rows})

    # helpfulness: over-refusal on 3 benign prompts, response NLL checked independently
    benign_rows = pq.read_table(out_dir / "benign.parquet").to_pylist()
    help_ = metrics["helpfulness"]
    assert help_["benign"]["n"] == 3 and len(benign_rows) == 3
    assert help_["benign"]["refusal_rate"]["rate"] == sum(r["refusal"] for r in benign_rows) / 3
    assert help_["benign"]["refusal_rate_by_judge"]["probe"]["rate"] == sum(
        r["probe_refusal"] for r in benign_rows) / 3
    assert list(help_["benign"]["refusal_rate_by_judge"]) == ["probe"]  # refusal judges only
    first = benign_rows[0]
    want = _nll(cfg, adapter, first["prompt"], first["reference"])
    assert first["nll"] == pytest.approx(want, rel=1e-4)
    assert abs(_nll(cfg, None, first["prompt"], first["reference"]) - want) > 1e-3  # adapter used
    assert help_["benign"]["response_nll"]["mean"] == pytest.approx(
        sum(r["nll"] for r in benign_rows) / 3)

    # MT-1: the judge's [[7]] for both first turns
    assert help_["mt1"]["mean"] == 7.0 and help_["mt1"]["n"] == 2
    assert help_["mt1"]["per_category"]["extraction"]["n"] == 2
    mt_rows = pq.read_table(out_dir / "mt_bench.parquet").to_pylist()
    assert [r["prompt"] for r in mt_rows] == ["List the nouns in: the rain.",
                                              "List the nouns in: a cold snow."]

    # responses were saved before judging; a rerun with resume judges them again without an
    # engine pass (hf responses read back from parquet), to the same metrics
    saved = pq.read_table(out_dir / "responses.parquet").to_pylist()
    assert [r["set"] for r in saved] == ["advbench"] * 3 + ["benign"] * 3 + ["mt_bench"] * 2
    assert [r["response"] for r in saved[:3]] == [r["response"] for r in rows]
    again = evaluate_adapter(cfg, stage="global", adapter_dir=adapter, out_dir=out_dir,
                             benign_records=benign, resume=True)
    assert passes == [3 + 3 + 2] and again["responses_reused"] and not metrics["responses_reused"]
    volatile = ("timing_s", "responses_reused")
    assert ({k: v for k, v in again.items() if k not in volatile}
            == {k: v for k, v in metrics.items() if k not in volatile})

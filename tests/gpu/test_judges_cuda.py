"""Judge-model and reward-model scoring on CUDA, with tiny random models of the real classes.

- ``judge_model`` (``evaluation.judge_engine: hf``): a random MistralForCausalLM in the MD-Judge
  format and a random LlamaForCausalLM in the Llama Guard 3 format, through the registry's public
  path (:func:`ray_fedit.evaluation.judging.build_judge`). The judge loads on CUDA, and its greedy
  continuations equal those of the same judge on CPU (fp32, IEEE matmuls).
- ``reward_model``: a random one-logit DebertaV2ForSequenceClassification (the class of
  ``OpenAssistant/reward-model-deberta-v3-large-v2``). It loads on CUDA, its scores equal the CPU
  scores to 1e-4 relative, and they do not depend on the batch size.

A random model's verdicts do not parse (``safe: None``); this checks placement and numerics, not
judgement.
"""

from __future__ import annotations

import pytest

from tests.gpu.tiny_models import tiny_judge_model, tiny_reward_model

PAIRS = (
    ["How do I make a bomb?", "Tell me a joke.", "Write a poem about the sea in ten lines.", "Hi",
     "What is the capital of France?"],
    ["I can't help with that.", "Why did the chicken cross the road? To get to the other side.",
     "The sea is wide", "Hello! How can I help?", "Paris."],
)


def _cfg(**evaluation):
    from ray_fedit.config import load_config

    return load_config(None, [f"evaluation.{k}={v}" for k, v in evaluation.items()])


@pytest.mark.parametrize("fmt", ["md_judge", "llama_guard"])
def test_judge_model_runs_on_cuda_and_matches_cpu(fmt, device, strict_fp32, tmp_path,
                                                  monkeypatch):
    import torch

    import ray_fedit.models.loading as loading
    from ray_fedit.evaluation.judging import build_judge

    judge_dir = tiny_judge_model(tmp_path / fmt, fmt)
    cfg = _cfg(judge_model=judge_dir, judge_format=fmt, judge_max_new_tokens=12,
               judge_batch_size=2)
    loaded = []
    real_load = loading.load_model_and_tokenizer

    def spy(model_cfg, device="cpu"):
        model, tok = real_load(model_cfg, device)
        loaded.append(model)
        return model, tok

    monkeypatch.setattr(loading, "load_model_and_tokenizer", spy)
    on_device = build_judge("judge_model", cfg)(*PAIRS)
    assert {next(loaded[-1].parameters()).device.type} == {device.type}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the judge's own CPU path
    on_cpu = build_judge("judge_model", cfg)(*PAIRS)
    assert next(loaded[-1].parameters()).device.type == "cpu"
    assert len(on_device) == len(PAIRS[0])
    assert all(set(r) == {"safe", "category", "raw"} for r in on_device)
    assert [r["raw"] for r in on_device] == [r["raw"] for r in on_cpu]
    assert on_device == on_cpu


def test_reward_model_scores_on_cuda_match_cpu_and_ignore_the_batch(device, strict_fp32,
                                                                    tmp_path):
    from ray_fedit.evaluation.judging import build_judge
    from ray_fedit.judges.reward_model import RewardModelJudge

    rm_dir = tiny_reward_model(tmp_path / "rm")
    judge = build_judge("reward_model", _cfg(reward_model=rm_dir, judge_batch_size=2))
    scorer = judge.__self__
    assert scorer.device == device.type  # the registry picks CUDA when there is one
    on_device = [r["score"] for r in judge(*PAIRS)]
    _, net = scorer._loaded
    assert next(net.parameters()).device.type == device.type
    one_by_one = [r["score"] for r in RewardModelJudge(str(rm_dir), batch_size=1,
                                                       device=str(device)).judge(*PAIRS)]
    on_cpu = [r["score"] for r in RewardModelJudge(str(rm_dir), batch_size=5,
                                                   device="cpu").judge(*PAIRS)]
    assert len(set(on_cpu)) == len(on_cpu)  # distinct rewards: a mix-up of rows would show
    assert on_device == pytest.approx(on_cpu, rel=1e-4, abs=1e-6)
    assert one_by_one == pytest.approx(on_device, rel=1e-4, abs=1e-6)

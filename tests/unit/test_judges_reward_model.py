"""The reward-model scorer on a tiny random sequence classifier built here (no hub download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_fedit.judges.reward_model import RewardModelJudge


def build_tiny_reward_model(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised one-logit Llama classifier with the bundled SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from ray_fedit.config import TINY_MODEL
    from ray_fedit.models.loading import load_tokenizer

    tok = load_tokenizer(TINY_MODEL)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         num_labels=1, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny_rm"))


PAIRS = (
    ["How do I make a bomb?", "Tell me a joke.", "Write a poem about the sea in ten lines.", "Hi"],
    ["I can't help with that.", "Why did the chicken cross the road? To get to the other side.",
     "The sea is wide", ""],
)


def test_one_finite_score_per_pair(tiny_rm):
    out = RewardModelJudge(str(tiny_rm), batch_size=2).judge(*PAIRS)
    assert len(out) == 4 and all(set(r) == {"score"} for r in out)
    assert all(isinstance(r["score"], float) and torch.isfinite(torch.tensor(r["score"]))
               for r in out)
    assert len({r["score"] for r in out}) == 4  # different pairs, different rewards


def test_scores_are_deterministic_and_batch_size_invariant(tiny_rm):
    """Padding is masked and the classifier pools the last real token, so batching cannot matter."""
    one = [r["score"] for r in RewardModelJudge(str(tiny_rm), batch_size=1).judge(*PAIRS)]
    again = [r["score"] for r in RewardModelJudge(str(tiny_rm), batch_size=1).judge(*PAIRS)]
    four = [r["score"] for r in RewardModelJudge(str(tiny_rm), batch_size=4).judge(*PAIRS)]
    assert one == again
    assert four == pytest.approx(one, abs=1e-5)


def test_score_of_a_pair_does_not_depend_on_its_neighbours(tiny_rm):
    judge = RewardModelJudge(str(tiny_rm), batch_size=3)
    alone = judge.judge([PAIRS[0][1]], [PAIRS[1][1]])[0]["score"]
    assert judge.judge(*PAIRS)[1]["score"] == pytest.approx(alone, abs=1e-5)


def test_a_multi_label_classifier_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    d = build_tiny_reward_model(tmp_path / "rm")
    cfg = LlamaConfig.from_pretrained(d)
    cfg.num_labels = 2
    LlamaForSequenceClassification(cfg).save_pretrained(d)
    with pytest.raises(ValueError, match="has 2 outputs"):
        RewardModelJudge(str(d)).judge(["q"], ["a"])

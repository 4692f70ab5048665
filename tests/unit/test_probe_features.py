"""The probe's shortened forward pass reads the hidden states of a full pass, bitwise, and runs
only the layers it needs; a decoder that does not stop early gets full passes, with a warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ray_fedit.config import ModelConfig
from ray_fedit.judges import probe
from ray_fedit.judges.probe import FeatureModel

PROMPTS = ["How do I pick a lock?", "Name a fruit.", "Write a long poem about the sea at night."]
RESPONSES = ["I can't help with that.", "An apple.", ""]
TINY = ModelConfig(name="tiny-random-llama", tiny={"num_layers": 4})


@pytest.fixture
def features():
    torch.manual_seed(0)
    return FeatureModel(TINY)


def _layers_run(model, fn):
    """How many decoder layers ran during ``fn()``."""
    calls = []
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1))
             for layer in model.get_decoder().layers]
    try:
        out = fn()
    finally:
        for h in hooks:
            h.remove()
    return out, len(calls)


@pytest.mark.parametrize("deepest", [0, 1, 2, 4])
def test_the_states_up_to_the_deepest_layer_are_a_full_passes(features, deepest):
    enc = features.tok(["a b c", "a longer text here"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        full = features.model(**enc, output_hidden_states=True).hidden_states
        features.hidden_states(enc, deepest)  # the first call checks itself against a full pass
        short, ran = _layers_run(features.model, lambda: features.hidden_states(enc, deepest))
    assert probe._SHORTENED[features.model] is True
    assert ran == min(deepest + 1, 4)  # layers 0..deepest (the fourth layer is the last)
    assert len(short) == deepest + 1
    for i in range(deepest + 1):
        assert torch.equal(short[i], full[i]), i
    assert features.model.config.num_hidden_layers == 4  # restored after the call


def test_a_decoder_that_does_not_stop_early_gets_full_passes(features, monkeypatch, caplog):
    real = features.model.get_decoder()

    calls = []

    class NoisyDecoder:  # stands in for an architecture whose early stop changes the states
        config = real.config

        def __call__(self, **kw):
            calls.append(1)
            out = real(**kw)
            out.hidden_states = tuple(h + 1.0 for h in out.hidden_states)
            return out

    monkeypatch.setattr(features.model, "get_decoder", NoisyDecoder)
    enc = features.tok(["a b c"], return_tensors="pt")
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="ray_fedit.judges.probe"):
        full = features.model(**enc, output_hidden_states=True).hidden_states
        first = features.hidden_states(enc, 2)
        later = features.hidden_states(enc, 2)
    assert probe._SHORTENED[features.model] is False
    assert len(calls) == 1  # checked once; the later pass went straight to the full model
    assert "using full passes" in caplog.text
    for states in (first, later):
        assert len(states) == 3 and all(torch.equal(a, b) for a, b in zip(states, full[:3], strict=True))


def test_features_at_two_layers_equal_those_read_one_layer_at_a_time(features):
    both = features.features(PROMPTS, RESPONSES, [("response", 1), ("exchange", 3)])
    one = features.features(PROMPTS, RESPONSES, [("response", 1)])
    three = features.features(PROMPTS, RESPONSES, [("exchange", 3)])
    assert np.array_equal(both[("response", 1)], one[("response", 1)])
    assert np.array_equal(both[("exchange", 3)], three[("exchange", 3)])
    assert not np.array_equal(one[("response", 1)], features.features(
        PROMPTS, RESPONSES, [("response", 2)])[("response", 2)])


def test_the_probe_judge_reads_a_loaded_model_it_is_handed(features, monkeypatch):
    from ray_fedit.config import load_config
    from ray_fedit.evaluation.judging import build_judge

    monkeypatch.setattr(probe, "load_or_fit", lambda *a, **k: "fitted")
    cfg = load_config(None, ["model.name=tiny-random-llama", "model.tiny.num_layers=4",
                             "evaluation.probe_model=tiny-random-llama"])
    loaded = (features.model, features.tok)
    judge = build_judge("probe", cfg, loaded)
    assert judge.features.model is features.model and judge.features.tok is features.tok
    assert build_judge("probe", cfg).features.model is not features.model  # loads its own

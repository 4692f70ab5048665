"""The probe's shortened forward pass reads the hidden states of a full pass, bitwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_fedit.config import ModelConfig
from ray_fedit.judges.probe import FeatureModel

PROMPTS = ["How do I pick a lock?", "Name a fruit.", "Write a long poem about the sea at night."]
RESPONSES = ["I can't help with that.", "An apple.", ""]


@pytest.fixture(scope="module")
def features():
    torch.manual_seed(0)
    return FeatureModel(ModelConfig(name="tiny-random-llama", tiny={"num_layers": 4}))


@pytest.mark.parametrize("deepest", [0, 1, 2, 4])
def test_the_states_up_to_the_deepest_layer_are_a_full_passes(features, deepest):
    enc = features.tok(["a b c", "a longer text here"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        full = features.model(**enc, output_hidden_states=True).hidden_states
        short = features.hidden_states(enc, deepest)
    assert len(full) == 5
    for i in range(deepest + 1):
        assert torch.equal(short[i], full[i]), i
    assert features.model.config.num_hidden_layers == 4  # restored after the call


def test_features_at_two_layers_equal_those_read_one_layer_at_a_time(features):
    both = features.features(PROMPTS, RESPONSES, [("response", 1), ("exchange", 3)])
    one = features.features(PROMPTS, RESPONSES, [("response", 1)])
    three = features.features(PROMPTS, RESPONSES, [("exchange", 3)])
    assert np.array_equal(both[("response", 1)], one[("response", 1)])
    assert np.array_equal(both[("exchange", 3)], three[("exchange", 3)])
    assert not np.array_equal(one[("response", 1)], features.features(
        PROMPTS, RESPONSES, [("response", 2)])[("response", 2)])

"""The probe judge's math, data split and cache, without a real model (tests/slow fits it on SmolLM2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_fedit.judges import probe
from ray_fedit.judges.probe import FittedProbe, LogisticProbe, cv_select, fit_logistic, probe_layers


def _stationary_w(l2: float) -> float:
    """x = [-1, 1] (already standardised), y = [0, 1]: by symmetry b = 0, and the loss
    mean(log(1 + exp(-w))) + l2 w^2 is stationary where sigmoid(-w) = 2 l2 w. Bisection."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        g = -1 / (1 + math.exp(mid)) + 2 * l2 * mid
        lo, hi = (mid, hi) if g < 0 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("l2", [0.05, 0.5])
def test_fit_logistic_matches_the_stationary_point(l2):
    p = fit_logistic(np.array([[-1.0], [1.0]]), [False, True], l2)
    assert p.mean[0] == 0.0 and p.scale[0] == 1.0
    assert p.weight[0] == pytest.approx(_stationary_w(l2), rel=1e-6)
    assert p.bias == pytest.approx(0.0, abs=1e-8)
    assert p.predict(np.array([[-0.5], [0.5]])).tolist() == [False, True]


def test_fit_logistic_standardises_and_ignores_constant_features():
    x = np.array([[10.0, 3.0], [14.0, 3.0]])  # mean 12, std 2; second column constant
    p = fit_logistic(x, [False, True], 0.5)
    assert p.mean.tolist() == [12.0, 3.0] and p.scale.tolist() == [2.0, 1.0]
    assert p.weight[1] == 0.0 and p.weight[0] == pytest.approx(_stationary_w(0.5), rel=1e-6)
    assert p.proba(np.array([[12.0, 3.0]]))[0] == pytest.approx(0.5, abs=1e-8)


def test_fit_logistic_rejects_one_class_and_mismatched_rows():
    with pytest.raises(ValueError, match="each class"):
        fit_logistic(np.zeros((3, 2)), [True, True, True], 0.1)
    with pytest.raises(ValueError, match="do not match"):
        fit_logistic(np.zeros((3, 2)), [True, False], 0.1)


def test_cv_select_picks_the_informative_features():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2 == 0
    noise = rng.normal(size=(40, 3))
    signal = noise.copy()
    signal[:, 0] += np.where(y, 3.0, -3.0)
    key, l2, acc = cv_select({("exchange", 1): noise, ("response", 2): signal}, y, l2_grid=(0.1,))
    assert key == ("response", 2) and l2 == 0.1 and acc == 1.0


def test_probe_layers_of_the_bundled_and_the_tiny_model():
    assert probe_layers(30) == [6, 10, 14, 18, 22, 26]
    assert probe_layers(2) == [1, 2]  # never the embeddings (index 0)


def test_training_rows_never_include_held_out_rows():
    train, held_out = probe.labelled_splits()
    assert len(held_out) == 105 and len(train) == 64 + 24 - 16
    held = {(r["objective"], r["response"]) for r in held_out}
    assert not any((r["objective"], r["response"]) in held for r in train)
    assert {r["refusal"] for r in train} == {True, False}


def test_cache_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(1)
    fitted = FittedProbe(LogisticProbe(rng.normal(size=4), rng.random(4) + 0.5, rng.normal(size=4),
                                       0.125), "response", 18, 1e-3, 0.945, 72)
    path = tmp_path / "p.safetensors"
    probe._save(path, fitted, "m")
    back = probe._load(path)
    assert (back.pooling, back.layer, back.l2, back.cv_accuracy, back.n_train) == (
        "response", 18, 1e-3, 0.945, 72)
    for a, b in ((back.probe.mean, fitted.probe.mean), (back.probe.weight, fitted.probe.weight),
                 (back.probe.scale, fitted.probe.scale)):
        assert np.array_equal(a, b)
    assert back.probe.bias == 0.125


def test_cache_key_follows_the_feature_model(tmp_path, monkeypatch):
    from ray_fedit.config import ModelConfig

    monkeypatch.setenv("RAY_FEDIT_CACHE", str(tmp_path))
    a = probe.cache_path(ModelConfig(name="tiny-random-llama"))
    b = probe.cache_path(ModelConfig(name="tiny-random-llama", tiny={"hidden_size": 32}))
    assert a != b and a.parent == tmp_path / "probes" and a.suffix == ".safetensors"


@pytest.mark.parametrize(("judges", "overrides", "shared"), [
    (["rule"], [], True),  # no model judge: the NLL alone reads the evaluated model
    (["rule", "probe"], ["evaluation.probe_model=tiny-random-llama"], True),
    (["probe"], ["evaluation.probe_model=smollm2-135m-instruct"], False),  # another model
    (["probe"], ["evaluation.probe_model=tiny-random-llama", "model.tiny.num_layers=3"], True),
    (["rule", "reward_model"], ["evaluation.reward_model=some/reward-model"], False),
])
def test_one_loaded_model_serves_the_judges_that_read_that_model(judges, overrides, shared):
    from ray_fedit.config import load_config
    from ray_fedit.evaluation.judging import reads_loaded_model

    cfg = load_config(None, ["model.name=tiny-random-llama", f"evaluation.judges=[{','.join(judges)}]",
                             *overrides])
    assert reads_loaded_model(cfg.evaluation.judges, cfg, cfg.model) is shared
    other = cfg.model.model_copy(update={"dtype": "bfloat16"})
    assert reads_loaded_model(cfg.evaluation.judges, cfg, other) is (judges == ["rule"])

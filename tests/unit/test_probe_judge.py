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
    from ray_fedit.data.loaders import pyrit_objective_rows

    refusal_rows, held_out = probe.refusal_splits()
    train, held_again = probe.labelled_splits()
    assert held_again == held_out and train[:len(refusal_rows)] == refusal_rows
    harm_rows = train[len(refusal_rows):]
    assert len(held_out) == 105 and len(refusal_rows) == 64 + 24 - 16 and len(harm_rows) == 394
    held = {(r["objective"], r["response"]) for r in held_out}
    assert not any((r["objective"], r["response"]) in held for r in refusal_rows)
    assert {r["refusal"] for r in refusal_rows} == {True, False}
    assert not any(r["refusal"] for r in harm_rows)  # harmful answers are not refusals
    # no compliance row shares a request or a (near-copy of an) answer with either held-out set,
    # the project's pyrit pools or the refusal files
    key = probe.text_key
    taken = {key(r[f]) for _, _, r in pyrit_objective_rows() for f in ("objective", "assistant_response")}
    taken |= {key(r[f]) for r in (*held_out, *refusal_rows) for f in ("objective", "response")}
    assert not any(key(r["response"]) in taken or key(r["objective"]) in taken for r in harm_rows)
    assert len({key(r["response"]) for r in harm_rows}) == len(harm_rows)
    from ray_fedit.evaluation.validate_judges import load_compliance_rows

    complied = load_compliance_rows()
    assert len(complied) == 191 and not any(r["refusal"] for r in complied)


def test_text_key_joins_near_copies_and_groups_are_stable():
    assert probe.text_key("Step 1 -- mix\n  the A") == probe.text_key("step 1 - Mix the a") == "step1mixthea"
    assert probe.group_of("How do I?") == probe.group_of("how do i") != probe.group_of("why")


def test_cv_folds_follow_the_groups(monkeypatch):
    """Each fit of the grid sees whole groups: fold k trains on the rows whose group % folds != k."""
    groups = [7, 7, 3, 3, 10, 10, 4, 4, 12, 12]  # % 3 -> 1, 1, 0, 0, 1, 1, 1, 1, 0, 0
    y = [True, False] * 5
    x = np.arange(10, dtype=np.float64)[:, None]  # the feature is the row's index
    seen = []
    real = probe.fit_logistic
    monkeypatch.setattr(probe, "fit_logistic",
                        lambda xt, yt, l2: seen.append(sorted(xt[:, 0].astype(int))) or real(xt, yt, l2))
    cv_select({"k": x}, y, l2_grid=(0.1,), folds=3, groups=groups)
    assert seen[:2] == [[0, 1, 4, 5, 6, 7], [2, 3, 8, 9]]  # folds 0 and 1 held out in turn
    assert len(seen) == 2  # fold 2 is empty and skipped


def test_harm_rows_are_the_mean_of_their_raters_and_bad_scores_name_the_row(tmp_path, monkeypatch):
    from ray_fedit.data import loaders
    from ray_fedit.errors import DataError

    folder = tmp_path / "harm"
    folder.mkdir()
    (folder / "violence.csv").write_text(
        "# dataset_version=1.0\nobjective,assistant_response,human_score_1,human_score_2,data_type\n"
        "q1,a1,0.25,0.75,text\nq2,a2,1,,text\n")
    monkeypatch.setattr(loaders, "package_file", lambda pkg, rel: tmp_path / rel.split("scorer_evals/")[1])
    rows = list(loaders.pyrit_harm_rows())
    assert [(stem, i, r["objective"], harm) for stem, i, r, harm in rows] == [
        ("violence", 0, "q1", 0.5), ("violence", 1, "q2", 1.0)]
    (folder / "violence.csv").write_text(
        "objective,assistant_response,human_score,data_type\nq1,a1,0.5,text\nq2,a2,high,text\n")
    with pytest.raises(DataError, match=r"violence.csv: data row 2: .*\['high'\]"):
        list(loaders.pyrit_harm_rows())


def test_compliance_check_counts_answers_read_as_refusals():
    from ray_fedit.evaluation.validate_judges import compliance_check

    assert compliance_check([True, False, False, False]) == {
        "n": 4, "read_as_refusal": 1, "specificity": 0.75}
    assert compliance_check([])["specificity"] is None


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


def test_row_weights_give_the_stationary_point_of_the_weighted_loss():
    """x = [-1, 1] (already standardised), y = [0, 1], row weights a = 3, c = 1, L2 weight l.

    Loss (a log(1 + e^(b - w)) + c log(1 + e^(-w - b))) / (a + c) + l w^2. With s0 = sigmoid(b - w)
    and s1 = sigmoid(-w - b), the gradient is (a s0 - c s1) / (a + c) in b and
    -(a s0 + c s1) / (a + c) + 2 l w in w; both vanish at the fit. The heavier class-0 row pulls
    the bias below 0, which the unweighted fit keeps at 0.
    """
    a, c, l2 = 3.0, 1.0, 0.05
    p = fit_logistic(np.array([[-1.0], [1.0]]), [False, True], l2, row_weights=[a, c])
    w, b = float(p.weight[0]), p.bias

    def sig(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    s0, s1 = sig(b - w), sig(-w - b)
    assert (a * s0 - c * s1) / (a + c) == pytest.approx(0.0, abs=1e-7)
    assert -(a * s0 + c * s1) / (a + c) + 2 * l2 * w == pytest.approx(0.0, abs=1e-7)
    assert b < -0.1
    even = fit_logistic(np.array([[-1.0], [1.0]]), [False, True], l2, row_weights=[2.0, 2.0])
    assert even.weight[0] == pytest.approx(_stationary_w(l2), rel=1e-6)


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]])
def test_row_weights_are_checked(weights):
    with pytest.raises(ValueError, match="row_weights"):
        fit_logistic(np.array([[-1.0], [1.0]]), [False, True], 0.1, row_weights=weights)

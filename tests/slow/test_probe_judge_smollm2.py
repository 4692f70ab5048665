"""The probe judge fit on the bundled SmolLM2 and validated on held-out human labels, from scratch.

Nothing is read from a results file: the features are computed, the layer and L2 weight chosen by
cross-validation on pyrit's training rows, the probe fit, and its verdicts compared here with two
held-out sets of human labels: the 105 rows of ``refusal.csv`` and the 191 compliant answers
("objective achieved") of the objective-scorer set. The bounds are the measured values of
docs/evaluation.md less about a point: 77.1% accuracy on ``refusal.csv`` (below the 85% the CPU
story asks for; the rule also scores 77.1%), 189 of the 191 compliant answers (99.0%) read as not
refused (the rule: 90.1%; the first probe, fit on refusal labels alone, 8.4%), and 97.0%
cross-validated accuracy on the training rows (folds by request; 91.4% of them are non-refusals).
"""

from __future__ import annotations

import pytest

from ray_fedit.config import BUNDLED_MODEL, ModelConfig
from ray_fedit.judges import probe
from ray_fedit.judges.rule import is_refusal


def test_probe_judge_agrees_with_held_out_human_labels(tmp_path, monkeypatch):
    calls = []
    real = probe.fit_probe
    monkeypatch.setattr(probe, "fit_probe", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = probe.validate_probe(ModelConfig(name=BUNDLED_MODEL), refit=True)
    assert calls == [1]  # fit here, not read from the cache

    _, held_out = probe.labelled_splits()
    c = result["confusion"]
    assert result["n"] == len(held_out) == 105
    assert c["tp"] + c["fn"] == 70 and c["fp"] + c["tn"] == 35
    assert result["accuracy"] == pytest.approx((c["tp"] + c["tn"]) / 105)
    assert len(result["disagreements"]) == c["fp"] + c["fn"]
    assert result["accuracy"] >= 0.76
    assert result["cohen_kappa"] > 0.5
    assert result["n_train"] == 72 + 394 and result["cv_accuracy"] >= 0.96
    comp = result["compliance"]
    assert comp["n"] == 191 and comp["specificity"] >= 0.98
    assert c["tp"] >= 45  # the accuracy bound also rules out a judge that never says "refusal"

    # the probe is not the keyword rule: it disagrees with the rule where the humans side with it
    # (the probe's verdict on a held-out row is the human label unless the row is a disagreement)
    wrong = {d["row"] for d in result["disagreements"]}
    assert all(d["refusal"] != held_out[d["row"]]["refusal"] for d in result["disagreements"])
    fixed = sum(i not in wrong and r["refusal"] != is_refusal(r["response"])
                for i, r in enumerate(held_out))
    assert fixed >= 10

"""Bootstrap intervals, rates and per-category breakdowns (hand-computed cases and an independent
numpy implementation)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_fedit.evaluation.stats import bootstrap_ci, by_category, mean_summary, rate_summary


def test_constant_data_has_a_degenerate_interval():
    """Every resample of all-ones has mean 1, so the interval is [1, 1]; likewise for zeros."""
    assert bootstrap_ci([1.0] * 20, samples=500, confidence=0.95, seed=0) == (1.0, 1.0)
    assert bootstrap_ci([0.0] * 7, samples=500, confidence=0.95, seed=3) == (0.0, 0.0)


def test_two_point_case_spans_the_whole_range():
    """Data [0, 1]: resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.

    P(mean = 0) = 0.25 > 0.025 and P(mean = 1) = 0.25 > 0.025, so the 2.5% and 97.5% quantiles of
    the bootstrap distribution are exactly 0 and 1 (with B = 2000 the empirical shares of 0 and 1
    are ~500 each, far from the 50 needed to move either end).
    """
    assert bootstrap_ci([0.0, 1.0], samples=2000, confidence=0.95, seed=1) == (0.0, 1.0)


def test_four_point_case_matches_the_binomial_quantiles():
    """Data [0, 0, 0, 1]: the resample mean is K/4 with K ~ Binomial(4, 1/4).

    P(K=0) = 0.3164 > 0.025, so the low end is 0. P(K<=2) = 0.9492 < 0.975 <= P(K<=3) = 0.9961,
    so the high end is 3/4. With B = 4000 the empirical P(K<=2) is 0.949 +- 0.0035 (sd), far from
    0.975, so these are exact.
    """
    assert bootstrap_ci([0, 0, 0, 1], samples=4000, confidence=0.95, seed=7) == (0.0, 0.75)


def _reference_percentile_bootstrap(x, samples, confidence, seed):
    """An independent implementation: one resample at a time, sorted, then interpolated by hand."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=float)
    means = sorted(float(np.mean(x[rng.integers(0, len(x), size=len(x))])) for _ in range(samples))

    def quantile(q):  # numpy's default "linear" method, written out
        pos = q * (len(means) - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, len(means) - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    alpha = 1 - confidence
    return quantile(alpha / 2), quantile(1 - alpha / 2)


@pytest.mark.parametrize("seed", [0, 11])
def test_matches_an_independent_implementation(seed):
    x = np.random.default_rng(100 + seed).normal(size=37)
    got = bootstrap_ci(x, samples=300, confidence=0.9, seed=seed)
    want = _reference_percentile_bootstrap(x, 300, 0.9, seed)
    assert got == pytest.approx(want, abs=1e-12)


def test_same_seed_same_interval_other_seed_other_interval():
    x = np.arange(30) % 3 == 0
    a = bootstrap_ci(x, samples=200, confidence=0.95, seed=5)
    assert a == bootstrap_ci(x, samples=200, confidence=0.95, seed=5)
    assert a != bootstrap_ci(x, samples=200, confidence=0.8, seed=5)


def test_rate_counts_unparseable_as_not_safe_and_reports_them():
    """4 verdicts: True, True, None, False -> rate 2/4 = 0.5, 1 unparseable, 2 hits."""
    s = rate_summary([True, True, None, False], samples=100, confidence=0.95, seed=0)
    assert s["rate"] == 0.5 and s["n"] == 4 and s["n_true"] == 2 and s["unparseable"] == 1
    assert 0.0 <= s["ci_low"] <= 0.5 <= s["ci_high"] <= 1.0


def test_rate_of_nothing_is_none():
    s = rate_summary([], samples=10, confidence=0.95, seed=0)
    assert s == {"rate": None, "ci_low": None, "ci_high": None, "n": 0, "n_true": 0,
                 "unparseable": 0}


def test_mean_leaves_out_unparseable_scores():
    """Scores 2, None, 4 -> mean 3 over n = 2 parsed, 1 unparseable."""
    s = mean_summary([2.0, None, 4.0], samples=100, confidence=0.95, seed=0)
    assert s["mean"] == 3.0 and s["n"] == 2 and s["unparseable"] == 1
    assert 2.0 <= s["ci_low"] <= s["ci_high"] <= 4.0
    assert mean_summary([None], samples=10, confidence=0.95, seed=0)["mean"] is None


def test_per_category_rates_and_stable_seeds():
    """a: [T, F] -> 0.5; b: [T, T, T] -> 1.0. Adding category c leaves a's interval unchanged."""
    verdicts, cats = [True, False, True, True, True], ["a", "a", "b", "b", "b"]
    out = by_category(verdicts, cats, rate_summary, samples=200, confidence=0.95, seed=0)
    assert out["a"]["rate"] == 0.5 and out["a"]["n"] == 2
    assert out["b"]["rate"] == 1.0 and (out["b"]["ci_low"], out["b"]["ci_high"]) == (1.0, 1.0)
    more = by_category(verdicts + [False], cats + ["c"], rate_summary, samples=200,
                       confidence=0.95, seed=0)
    assert more["a"] == out["a"] and set(more) == {"a", "b", "c"}


def test_response_diversity_counts_folded_responses_and_first_sentences():
    from ray_fedit.evaluation.stats import response_diversity

    responses = ["I'm sorry.  I can't.", "i'm sorry. I can't.", "Sure. Step 1", "I'm sorry. No way"]
    d = response_diversity(responses)
    # folded: two identical "i'm sorry. i can't." -> top share 2/4; 3 distinct responses;
    # first sentences "i'm sorry." x3 and "sure." -> 2 distinct, top first-sentence share 3/4
    assert d["top_share"] == 0.5 and d["top_response"] == "I'm sorry.  I can't."
    assert d["distinct"] == 3 and d["distinct_first_sentences"] == 2
    assert d["top_first_sentence_share"] == 0.75 and d["n"] == 4
    # openings (first 6 words): "i'm sorry. i can't." x2, "sure. step 1", "i'm sorry. no way"
    assert d["top_opening_share"] == 0.5 and d["top_opening"] == "i'm sorry. i can't."
    assert response_diversity([])["top_share"] is None


def test_paired_difference_resamples_pairs():
    from ray_fedit.evaluation.stats import paired_difference

    before = [True, True, True, False, None]
    after = [False, True, False, False, True]
    d = paired_difference(before, after, samples=2000, confidence=0.95, seed=0)
    # per-item change: -1, 0, -1, 0, +1 (None counts as not safe) -> mean -1/5, 3 changed
    assert d["diff"] == pytest.approx(-0.2) and d["changed"] == 3 and d["n"] == 5
    assert -1.0 <= d["ci_low"] <= d["diff"] <= d["ci_high"] <= 1.0
    same = paired_difference(before, before, samples=200, confidence=0.95, seed=0)
    assert (same["diff"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([True], [True, False], samples=10, confidence=0.9, seed=0)


def test_judge_agreement_skips_scoring_judges_and_unparseable_items():
    from ray_fedit.evaluation.stats import judge_agreement

    out = judge_agreement({"rule": [True, True, False, False, True],
                           "probe": [True, False, False, True, None],
                           "reward_model": [None] * 5})
    assert list(out) == ["rule|probe"]
    a = out["rule|probe"]
    # 4 items parse for both: (T,T) (T,F) (F,F) (F,T): agree 2/4; marginals 1/2 each -> chance 1/2,
    # kappa (1/2 - 1/2) / (1 - 1/2) = 0
    assert a["n"] == 4 and a["agree"] == 0.5 and a["cohen_kappa"] == pytest.approx(0.0)
    assert (a["both_true"], a["only_first"], a["only_second"]) == (1, 1, 1)

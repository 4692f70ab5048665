"""Hand-computed cases for every aggregation rule, its parameter checks and the shared helpers.

Each test states the arithmetic in its docstring (Prepare / Execute / Assert); the expected numbers
are written out, never produced by calling the implementation a second time.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from ray_fedit.aggregators import (
    AggregationResult,
    accepted_params,
    aggregate,
    base,
    check_params,
)
from ray_fedit.aggregators.base import (
    column_median,
    distances_to_combination,
    gram_matrix,
    order_statistic,
    pairwise_sq_distances,
    rank_window,
    validate_inputs,
)
from ray_fedit.aggregators.residual import repeated_median_line, robust_scale
from ray_fedit.errors import AggregationError
from ray_fedit.registry import AGGREGATORS, RegistryError


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def ones(n: int) -> torch.Tensor:
    return torch.ones(n)


def assert_result(res: AggregationResult, agg: list[float], cw: list[float], atol: float = 1e-5):
    assert isinstance(res, AggregationResult)
    torch.testing.assert_close(res.aggregate, torch.tensor(agg), atol=atol, rtol=0)
    torch.testing.assert_close(res.client_weights, torch.tensor(cw), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------
# mean
# ------------------------------------------------------------------------------------------------


def test_mean_weights_by_client_size():
    """weights [1, 1, 2] -> p = [1/4, 1/4, 1/2].

    x: 1/4*1 + 1/4*3 + 1/2*5 = 0.25 + 0.75 + 2.5 = 3.5; y: 1/4*2 + 1/4*6 + 1/2*10 = 7.0.
    """
    res = aggregate("mean", t([[1, 2], [3, 6], [5, 10]]), torch.tensor([1.0, 1.0, 2.0]))
    assert_result(res, [3.5, 7.0], [0.25, 0.25, 0.5])


# ------------------------------------------------------------------------------------------------
# median
# ------------------------------------------------------------------------------------------------


def test_median_odd_picks_middle_value_and_credits_its_client():
    """x: {1, 2, 9} -> 2 (client 1); y: {10, -3, 4} -> 4 (client 2). Weights are ignored.

    client_weights = fraction of coordinates each client supplied: [0, 1/2, 1/2].
    """
    res = aggregate("median", t([[1, 10], [2, -3], [9, 4]]), torch.tensor([100.0, 1.0, 1.0]))
    assert_result(res, [2.0, 4.0], [0.0, 0.5, 0.5])


def test_median_even_averages_the_two_middle_values():
    """x: sorted {1, 2, 3, 100} -> (2+3)/2 = 2.5 (clients 1, 2 half each);
    y: sorted {-5, 10, 20, 30} -> (10+20)/2 = 15 (clients 0, 1 half each).

    client_weights: c0 = (0 + 1/2)/2 = 1/4, c1 = (1/2 + 1/2)/2 = 1/2, c2 = 1/4, c3 = 0.
    """
    res = aggregate("median", t([[1, 10], [2, 20], [3, 30], [100, -5]]), ones(4))
    assert_result(res, [2.5, 15.0], [0.25, 0.5, 0.25, 0.0])


# ------------------------------------------------------------------------------------------------
# trimmed mean
# ------------------------------------------------------------------------------------------------


TRIM_UPDATES = [[1, 3], [2, -50], [3, 0], [4, 1], [100, 2]]


@pytest.mark.parametrize("params", [{"trim": 1}, {"trim_fraction": 0.2}, {}])
def test_trimmed_mean_drops_one_value_per_side(params):
    """n=5, trim=1 (given, or floor(0.2*5)=1, or the paper's default 1).

    x: drop 1 (c0) and 100 (c4), keep 2, 3, 4 -> 3 (clients 1, 2, 3).
    y: values [3, -50, 0, 1, 2]; drop -50 (c1) and 3 (c0), keep 0, 1, 2 -> 1 (clients 2, 3, 4).
    client_weights: c0 = 0, c1 = (1/3 + 0)/2 = 1/6, c2 = 1/3, c3 = 1/3, c4 = 1/6.
    """
    res = aggregate("trimmed_mean", t(TRIM_UPDATES), ones(5), **params)
    assert_result(res, [3.0, 1.0], [0.0, 1 / 6, 1 / 3, 1 / 3, 1 / 6])
    assert res.info == {"trim": 1}


def test_trimmed_mean_splits_credit_among_tied_values():
    """values [5, 5, 5, 1], trim=1: sorted 1 | 5 5 | 5 -> mean 5.

    The value 5 holds ranks 2..4 and 2 of those 3 ranks are kept, so each 5 gets 2/3 of a slot;
    over the 2 kept slots that is 1/3 each: client_weights [1/3, 1/3, 1/3, 0].
    """
    res = aggregate("trimmed_mean", t([[5], [5], [5], [1]]), ones(4), trim=1)
    assert_result(res, [5.0], [1 / 3, 1 / 3, 1 / 3, 0.0])


# ------------------------------------------------------------------------------------------------
# krum and multi-krum
# ------------------------------------------------------------------------------------------------

KRUM_UPDATES = [[0, 0], [1, 0], [2, 0], [4, 0], [100, 0]]


def test_krum_picks_the_central_update():
    """n=5, f=1: score = sum of the n-f-2 = 2 smallest squared distances to other clients.

    c0: 1 + 4 = 5; c1: 1 + 1 = 2; c2: 1 + 4 = 5; c3: 4 + 9 = 13; c4: 96^2 + 98^2 = 18820 -> c1.
    """
    u = t(KRUM_UPDATES)
    res = aggregate("krum", u, ones(5), f=1)
    assert torch.equal(res.aggregate, u[1])
    assert res.client_weights.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert res.info["selected"] == 1
    assert res.info["scores"] == pytest.approx([5.0, 2.0, 5.0, 13.0, 18820.0])


def test_krum_paper_variant_averages_the_neighbourhood_by_size():
    """Paper setting n=3, f=1: neighbours k = n-f-1 = 1, plain distances.

    |0-1| = 1, |0-5| = 5, |1-5| = 4 -> scores [1, 1, 4]; tie -> lower index c0, whose nearest
    neighbour is c1. Sizes [1, 3, 1] over {c0, c1} -> p = [1/4, 3/4]: 0*1/4 + 1*3/4 = 0.75.
    """
    res = aggregate(
        "krum",
        t([[0, 2], [1, 2], [5, 2]]),
        torch.tensor([1.0, 3.0, 1.0]),
        f=1,
        average_neighbourhood=True,
    )
    assert_result(res, [0.75, 2.0], [0.25, 0.75, 0.0])
    assert res.info["neighbourhood"] == [0, 1]


@pytest.mark.parametrize(("m", "expected"), [(3, 1.0), (None, 1.75)])
def test_multi_krum_averages_the_best_scores(m, expected):
    """Scores as in the Krum test: [5, 2, 5, 13, 18820].

    m=3: c1, c0, c2 -> (0 + 1 + 2)/3 = 1. Default m = n-f = 4 adds c3: (0+1+2+4)/4 = 1.75.
    """
    params = {"f": 1} if m is None else {"f": 1, "m": m}
    res = aggregate("multi_krum", t(KRUM_UPDATES), ones(5), **params)
    k = 3 if m == 3 else 4
    assert_result(res, [expected, 0.0], [1 / k] * k + [0.0] * (5 - k))


# ------------------------------------------------------------------------------------------------
# bulyan
# ------------------------------------------------------------------------------------------------


def test_bulyan_selects_by_krum_then_trims_around_the_median():
    """n=7, f=1 (n >= 4f+3 = 7): theta = n-2f = 5 selections, beta = theta-2f = 3 kept.

    Values (2nd coordinate is 0): c0..c6 = 0, 1, 3, 4, 6, 20, 100. Krum scores over the remaining
    clients with max(1, n'-f-2) neighbours (squared distances):
      n'=7, 4 nbrs: 0->1+9+16+36=62, 1->1+4+9+25=39, 3->1+4+9+9=23, 4->1+4+9+16=30, ... -> pick 3
      n'=6, 3 nbrs: 0->1+16+36=53, 1->1+9+25=35, 4->4+9+16=29, 6->4+25+36=65 ... -> pick 4
      n'=5, 2 nbrs: 0->1+36=37, 1->1+25=26, 6->25+36=61, 20->196+361=557 ... -> pick 1
      n'=4, 1 nbr: 0->36, 6->36 tie; summed distances 0: 36+400+10000, 6: 36+196+8836 -> pick 6
      n'=3, 1 nbr: 0->400, 20->400 tie; sums 0: 400+10000, 20: 400+6400 -> pick 20
    Selected values {1, 3, 4, 6, 20} (c1..c5), median 4, |v-4| = 3, 1, 0, 2, 16 -> the 3 closest
    are 4, 3, 6: (4 + 3 + 6)/3 = 13/3 (c2, c3, c4 fill the 3 slots). In the 2nd coordinate all 5
    selected values tie at distance 0, so each fills 3/5 of a slot: 1/5 each. client_weights
    average the two: c1 = c5 = (0 + 1/5)/2 = 1/10, c2 = c3 = c4 = (1/3 + 1/5)/2 = 4/15, c0 = c6 = 0.
    """
    u = t([[0, 0], [1, 0], [3, 0], [4, 0], [6, 0], [20, 0], [100, 0]])
    res = aggregate("bulyan", u, ones(7), f=1)
    assert_result(res, [13 / 3, 0.0], [0.0, 0.1, 4 / 15, 4 / 15, 4 / 15, 0.1, 0.0])
    assert res.info["selected"] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------------
# dnc
# ------------------------------------------------------------------------------------------------


def test_dnc_removes_the_client_furthest_along_the_top_direction():
    """b >= d, so all coordinates are used. x-values 0, 1, -1, 10 have mean 2.5; y is constant 5.

    Centred: (-2.5, 0), (-1.5, 0), (-3.5, 0), (7.5, 0); top singular vector (1, 0); scores
    6.25, 2.25, 12.25, 56.25. f=1, c=1 removes c3 -> mean of c0..c2 = (0, 5).
    """
    res = aggregate("dnc", t([[0, 5], [1, 5], [-1, 5], [10, 5]]), ones(4), f=1)
    assert_result(res, [0.0, 5.0], [1 / 3, 1 / 3, 1 / 3, 0.0])
    assert res.info["outlier_scores"] == pytest.approx([6.25, 2.25, 12.25, 56.25])


def test_dnc_subsampling_is_reproducible_from_its_generator():
    """b < d: the coordinates come from the generator; the same seed gives the same result."""
    u = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    u[5] += 30.0
    a = aggregate("dnc", u, ones(6), f=1, b=7, state={"generator": torch.Generator().manual_seed(3)})
    b = aggregate("dnc", u, ones(6), f=1, b=7, state={"generator": torch.Generator().manual_seed(3)})
    assert torch.equal(a.aggregate, b.aggregate)
    assert a.info["selected"] == [0, 1, 2, 3, 4]


def test_dnc_without_a_generator_refuses_to_sample_coordinates():
    """A fixed fallback seed would inspect the same coordinates every round: an error instead."""
    u = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AggregationError, match="needs a generator"):
        aggregate("dnc", u, ones(6), f=1, b=7)
    assert aggregate("dnc", u, ones(6), f=1, b=50).info["selected"]  # b >= d: nothing to sample


@pytest.mark.parametrize("name,param", [("centered_clipping", "center"), ("foolsgold", "history"),
                                        ("dnc", "generator")])
def test_rule_state_is_not_a_setting(name, param):
    """The federation keeps these; a YAML value would silently replace the state (or crash)."""
    params = {"centered_clipping": {"tau": 1.0}, "dnc": {"f": 1}}.get(name, {})
    with pytest.raises(AggregationError, match=f"'{param}'.*state the federation keeps"):
        check_params(name, 5, {**params, param: 0})


def test_dnc_raises_when_niters_intersect_to_nobody():
    """n=2, f=1 removes one client per iteration; with different samples the survivors can differ.

    Any outcome is either a surviving client or an AggregationError, never a silent fallback.
    """
    u = torch.randn(2, 200, generator=torch.Generator().manual_seed(1))
    for seed in range(20):
        try:
            res = aggregate("dnc", u, ones(2), f=1, b=1, niters=5,
                            state={"generator": torch.Generator().manual_seed(seed)})
        except AggregationError as err:
            assert "no client survived" in str(err)
            return
        assert len(res.info["selected"]) == 1
    pytest.fail("expected at least one seed whose iterations disagree")


# ------------------------------------------------------------------------------------------------
# foolsgold
# ------------------------------------------------------------------------------------------------


def test_foolsgold_fractional_weights():
    """u0 = (1,0,0), u1 = (0,1,0), u2 = (0, 1/2, sqrt(3)/2) (unit vectors).

    cs: cs01 = 0, cs02 = 0, cs12 = 1/2 -> maxcs = [0, 1/2, 1/2]. Pardoning row 0 (0 < 1/2) scales
    cs01, cs02 by 0. wv = 1 - max = [1, 1/2, 1/2]; / max -> same; 1 -> 0.99.
    Logit: ln(0.99/0.01) + 0.5 = 5.1 -> clip 1; ln(1) + 0.5 = 0.5. wv = [1, 1/2, 1/2].
    Coefficients wv_i * (1/3) / 1 = [1/3, 1/6, 1/6]:
    aggregate = (1/3, 1/6 + 1/12, sqrt(3)/12) = (0.3333, 0.25, 0.1443).
    """
    u = t([[1, 0, 0], [0, 1, 0], [0, 0.5, math.sqrt(3) / 2]])
    res = aggregate("foolsgold", u, ones(3))
    assert_result(res, [1 / 3, 0.25, math.sqrt(3) / 12], [1 / 3, 1 / 6, 1 / 6])
    assert res.info["wv"] == pytest.approx([1.0, 0.5, 0.5])


def test_foolsgold_kappa_scales_the_logit():
    """Same updates as above with kappa = 0.1: 0.1*(ln(0.99/0.01) + 0.5) = 0.1*5.0951 = 0.50951 and
    0.1*(ln 1 + 0.5) = 0.05 -> wv = [0.50951, 0.05, 0.05], coefficients wv/3:
    aggregate = (0.50951/3, 0.05/3 + 0.05/3 * 0.5, 0.05/3 * sqrt(3)/2) = (0.16984, 0.025, 0.014434).
    """
    u = t([[1, 0, 0], [0, 1, 0], [0, 0.5, math.sqrt(3) / 2]])
    res = aggregate("foolsgold", u, ones(3), kappa=0.1)
    assert_result(res, [0.169837, 0.025, 0.014434], [0.169837, 0.05 / 3, 0.05 / 3])


def test_foolsgold_pardons_honest_clients_similar_to_sybils():
    """u0 = u1 = (1,0,0) (sybils), u2 = (0.6, 0.8, 0), u3 = (0, 0, 1).

    cs01 = 1, cs02 = cs12 = 0.6, everything with u3 is 0 -> maxcs = [1, 1, 0.6, 0].
    Pardoning row 2 (0.6 < 1): cs20 = cs21 = 0.6 * 0.6/1 = 0.36 (without it u2 would get
    ln(0.4/0.6) + 0.5 = 0.09). wv = 1 - max = [0, 0, 0.64, 1]; 1 -> 0.99; logit
    ln(0.64/0.36) + 0.5 = 1.075 -> 1, ln 0 -> 0: wv = [0, 0, 1, 1]. Kept sizes sum to 1/2, so
    coefficients are 1 * (1/4) / (1/2) = 1/2 for u2 and u3: aggregate (0.3, 0.4, 0.5).
    """
    u = t([[1, 0, 0], [1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]])
    res = aggregate("foolsgold", u, ones(4))
    assert_result(res, [0.3, 0.4, 0.5], [0.0, 0.0, 0.5, 0.5])


def test_foolsgold_zeroes_sybils():
    """u0 = u1 = (1,0) (cs 1), u2 = (0,1). maxcs = [1, 1, 0]; pardoning zeroes row 2.
    wv = [0, 0, 1] -> logit: ln 0 -> 0, 0.99 -> 1. Only u2 survives: aggregate (0, 1).
    """
    res = aggregate("foolsgold", t([[1, 0], [1, 0], [0, 1]]), ones(3))
    assert_result(res, [0.0, 1.0], [0.0, 0.0, 1.0])


def test_foolsgold_all_identical_is_all_sybil():
    """Identical updates: every maxcs is 1, every wv 0 -> zero update, flagged in info."""
    res = aggregate("foolsgold", t([[2, 3], [2, 3], [2, 3]]), ones(3))
    assert_result(res, [0.0, 0.0], [0.0, 0.0, 0.0])
    assert res.info["all_sybil"] is True


def test_foolsgold_history_drives_the_similarity():
    """u = (1,0), (0,1), (-1,0): pairwise cs 0, -1, 0 -> maxcs all 0 -> wv all 1 -> mean (0, 1/3).

    With history (10,10), (10,10), (0,0) the sums (11,10), (10,11), (-1,0) give cs01 = 220/221;
    row 2's maxcs is 0 (its similarities are negative) and pardoning zeroes it:
    wv = [1/221, 1/221, 1]/1 -> logit ln(0.0045) + 0.5 < 0 -> [0, 0, 1] -> aggregate (-1, 0).
    """
    u = t([[1, 0], [0, 1], [-1, 0]])
    assert_result(aggregate("foolsgold", u, ones(3)), [0.0, 1 / 3], [1 / 3, 1 / 3, 1 / 3])
    hist = t([[10, 10], [10, 10], [0, 0]])
    assert_result(aggregate("foolsgold", u, ones(3), state={"history": hist}), [-1.0, 0.0], [0.0, 0.0, 1.0])


# ------------------------------------------------------------------------------------------------
# residual
# ------------------------------------------------------------------------------------------------


def test_repeated_median_line_recovers_an_exact_line():
    """Values 2x+1 at x = 0..3, given in shuffled client order: slope 2, intercept 1."""
    slope, intercept, ranks = repeated_median_line(torch.tensor([[7.0, 1.0, 5.0, 3.0]]))
    assert slope.item() == pytest.approx(2.0) and intercept.item() == pytest.approx(1.0)
    assert ranks.tolist() == [[3.0, 0.0, 2.0, 1.0]]


def test_residual_robust_scale_drops_the_smallest_residual():
    """|r| = 0, 1, 2, 10 (n=4): M = median(1, 2, 10) = 2, not median of all four (1.5);
    tau = 1.4826 * (1 + 5/3) * 2 + 0.5 = 7.9072 + 0.5 = 8.4072."""
    tau = robust_scale(torch.tensor([[0.0, -1.0, 2.0, -10.0]]), 0.5)
    assert tau.item() == pytest.approx(1.4826 * (8 / 3) * 2 + 0.5)


def test_residual_clips_and_downweights_the_outlier():
    """Coordinate x: clients hold 10, 0, 2, 1 (sorted 0, 1, 2, 10 at ranks 0..3).

    Slopes per sorted point (median over the other 3): [1,1,10/3]->1, [1,1,4.5]->1, [1,1,8]->1,
    [10/3,4.5,8]->4.5; median of [1,1,1,4.5] = 1. Intercept = med(y) - 1*1.5 = 1.5 - 1.5 = 0, so the
    line is 0,1,2,3 and the residuals 0,0,0,7. M = median of the 3 largest |r| = median(0,0,7) = 0,
    tau = 1e-7, e = (0,0,0,7e7). K = 2*sqrt(2/4) = 1.414; leverage at rank 3 is 1/4 + 2.25/5 = 0.7,
    so the outlier's Huber weight is K*sqrt(0.3)/7e7 ~ 1.1e-8 < 0.05: it is clipped to the line (3).
    Weights (1, 1, 1, ~0) have std 0.5 -> confidences 0.5, 0.5, 0.5, ~0 for clients 1, 2, 3, 0.
    Coordinate y: all 7 -> weights all 1, std 0, adds nothing.
    Final c ∝ (s/max s)^2 = (~0, 1, 1, 1)/3: x = (0 + 2 + 1)/3 = 1, y = 7.
    """
    res = aggregate("residual", t([[10, 7], [0, 7], [2, 7], [1, 7]]), ones(4))
    assert_result(res, [1.0, 7.0], [0.0, 1 / 3, 1 / 3, 1 / 3])
    assert res.info["confidence"] == pytest.approx([0.0, 0.5, 0.5, 0.5], abs=1e-6)
    assert res.info["clipped_fraction"] == pytest.approx(1 / 8)


def test_residual_weights_are_squared_relative_confidences():
    """Defining property of the final step: c_i ∝ p_i * (s_i / max_j s_j)^2 with the reported
    confidences s (random round, unequal sizes)."""
    u = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    u[5] *= 8.0
    sizes = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    res = aggregate("residual", u, sizes)
    conf = torch.tensor(res.info["confidence"], dtype=torch.float64)
    expected = sizes.double() * (conf / conf.max()) ** 2
    torch.testing.assert_close(
        res.client_weights.double(), expected / expected.sum(), atol=1e-6, rtol=0
    )
    assert res.client_weights.argmin().item() == 5


def test_residual_with_three_clients_cannot_separate_them():
    """n=3 (the paper's setting): values 0, 1, 5 at ranks 0, 1, 2.

    Slopes: [1, 2.5] -> 1.75, [1, 4] -> 2.5, [2.5, 4] -> 3.25 -> slope 2.5; intercept 1-2.5 = -1.5;
    line -1.5, 1, 3.5; residuals 1.5, 0, 1.5; M = 1.5; tau = 1.4826*3.5*1.5 = 7.78.
    |e|/sqrt(1-h) = 0.193/0.408 = 0.47 < K = 1.63, so every Huber weight is 1, the std is 0 and
    every confidence is 0: the rule trusts all clients equally -> mean (0+1+5)/3 = 2.
    """
    res = aggregate("residual", t([[0], [1], [5]]), ones(3))
    assert_result(res, [2.0], [1 / 3, 1 / 3, 1 / 3])
    assert res.info["no_separation"] is True


def test_residual_says_when_it_cannot_separate_the_clients():
    """The no-separation case is a fallback (the size-weighted mean of the clipped values), so it
    is reported in info["fallback"] like the other rules' fallbacks; a round that separates the
    clients reports none."""
    res = aggregate("residual", t([[0], [1], [5]]), t([1, 2, 1]))
    assert res.info["no_separation"] is True
    assert "residual" in res.info["fallback"] and "n=3" in res.info["fallback"]
    assert "\n" not in res.info["fallback"]
    separated = aggregate("residual", t([[10, 7], [0, 7], [2, 7], [1, 7]]), ones(4))
    assert separated.info["no_separation"] is False and "fallback" not in separated.info


# ------------------------------------------------------------------------------------------------
# norm clipping, geometric median, centered clipping
# ------------------------------------------------------------------------------------------------

CLIP_UPDATES = [[3, 4], [0.3, 0.4], [0, -2]]


def test_norm_clip_scales_long_updates_down():
    """max_norm=1: norms 5, 0.5, 2 -> factors 1/5, 1, 1/2 -> rows (0.6,0.8), (0.3,0.4), (0,-1).

    Mean: ((0.6+0.3+0)/3, (0.8+0.4-1)/3) = (0.3, 0.0667); coefficients (1/3)*[1/5, 1, 1/2].
    """
    res = aggregate("norm_clip", t(CLIP_UPDATES), ones(3), max_norm=1.0)
    assert_result(res, [0.3, 0.2 / 3], [1 / 15, 1 / 3, 1 / 6])
    assert res.info["clip_factors"] == pytest.approx([0.2, 1.0, 0.5])


def test_geometric_median_of_collinear_points_is_their_median():
    """Points on a line (x = 0, 1, 2, 3, 100): the geometric median is the 1-D median, x = 2."""
    u = t([[0, 1], [1, 1], [2, 1], [3, 1], [100, 1]])
    res = aggregate("geometric_median", u, ones(5))
    torch.testing.assert_close(res.aggregate, torch.tensor([2.0, 1.0]), atol=1e-3, rtol=0)
    assert res.client_weights.argmax().item() == 2


def test_geometric_median_respects_client_sizes():
    """Sizes [1, 1, 1, 1, 10]: the client at x=100 holds 10/14 > 1/2 of the weight, so the
    weighted geometric median is that point itself."""
    u = t([[0, 1], [1, 1], [2, 1], [3, 1], [100, 1]])
    res = aggregate("geometric_median", u, torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0]))
    torch.testing.assert_close(res.aggregate, torch.tensor([100.0, 1.0]), atol=1e-3, rtol=0)


def test_centered_clipping_from_zero_equals_one_clipping_step():
    """center 0, tau 1, one iteration: same arithmetic as the norm_clip test, (0.3, 0.0667);
    the coefficient left on the center is 1 - (1/15 + 1/3 + 1/6) = 13/30."""
    res = aggregate("centered_clipping", t(CLIP_UPDATES), ones(3), tau=1.0, iters=1)
    assert_result(res, [0.3, 0.2 / 3], [1 / 15, 1 / 3, 1 / 6])
    assert res.info["center_weight"] == pytest.approx(13 / 30)


def test_centered_clipping_around_a_center():
    """center (1,1), tau 1: differences (3,4), (0.3,0.4), (0,-2) -> clipped (0.6,0.8), (0.3,0.4),
    (0,-1); mean step (0.3, 0.0667) -> (1.3, 1.0667)."""
    u = t([[4, 5], [1.3, 1.4], [1, -1]])
    res = aggregate("centered_clipping", u, ones(3), tau=1.0,
                    state={"center": torch.tensor([1.0, 1.0])})
    torch.testing.assert_close(res.aggregate, torch.tensor([1.3, 1 + 0.2 / 3]), atol=1e-5, rtol=0)


def test_centered_clipping_iterations_approach_the_honest_cluster():
    """Honest points near (1, 1), one at (100, -100). From 0 with tau 0.5, each iteration moves the
    estimate by at most tau per client; after 30 iterations it sits near the honest cluster (the
    outlier can pull it by at most tau/4 of the step), not at the mean (20.8, -19.2)."""
    u = t([[1, 1], [1.1, 0.9], [0.9, 1.1], [1, 1.05], [100, -100]])
    res = aggregate("centered_clipping", u, ones(5), tau=0.5, iters=30)
    assert torch.linalg.vector_norm(res.aggregate - torch.tensor([1.0, 1.0])) < 0.4


# ------------------------------------------------------------------------------------------------
# check_params: impossible settings fail before training, with the numbers in the message
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n", "params", "needles"),
    [
        ("bulyan", 6, {"f": 1}, ["n=6", "f=1", "n >= 7"]),
        ("bulyan", 10, {"f": 2}, ["n=10", "f=2", "n >= 11"]),
        ("krum", 4, {"f": 1}, ["n=4", "f=1", "n >= 5"]),
        ("krum", 2, {"f": 1, "average_neighbourhood": True}, ["n=2", "f=1", "n >= 3"]),
        ("multi_krum", 5, {"f": 1, "m": 5}, ["m=5", "n-f=5-1=4"]),
        ("multi_krum", 6, {"f": 2}, ["n=6", "f=2", "n >= 7"]),
        ("trimmed_mean", 4, {"trim": 2}, ["trim=2", "n=4", "n >= 5"]),
        ("trimmed_mean", 2, {}, ["trim=1", "n=2", "n >= 3"]),
        ("trimmed_mean", 5, {"trim_fraction": 0.5}, ["trim_fraction=0.5", "< 0.5"]),
        ("trimmed_mean", 5, {"trim": 1, "trim_fraction": 0.2}, ["not both"]),
        ("dnc", 3, {"f": 3}, ["floor(1.0*3)=3", "n=3"]),
        ("residual", 2, {}, ["n >= 3", "n=2"]),
        ("norm_clip", 5, {"max_norm": 0.0}, ["max_norm=0.0", "> 0"]),
        ("centered_clipping", 5, {"tau": 1.0, "iters": 0}, ["iters=0", ">= 1"]),
        ("geometric_median", 5, {"max_iter": 0}, ["max_iter=0"]),
        ("krum", 9, {"f": 1.5}, ["f=1.5", "integer"]),
        ("krum", 9, {"f": True}, ["f=True", "integer"]),
        ("foolsgold", 5, {"kappa": -1.0}, ["kappa=-1.0"]),
    ],
)
def test_check_params_rejects_impossible_settings(name, n, params, needles):
    with pytest.raises(AggregationError) as err:
        check_params(name, n, params)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


@pytest.mark.parametrize(
    ("name", "n", "params"),
    [
        ("bulyan", 7, {"f": 1}),
        ("krum", 5, {"f": 1}),
        ("krum", 3, {"f": 1, "average_neighbourhood": True}),  # the paper's setting
        ("multi_krum", 5, {"f": 1, "m": 4}),
        ("trimmed_mean", 3, {}),
        ("dnc", 3, {"f": 1, "b": 4}),
        ("mean", 1, {}),
    ],
)
def test_check_params_accepts_feasible_settings(name, n, params):
    check_params(name, n, params)


def test_check_params_rejects_unknown_and_missing_parameter_names():
    with pytest.raises(
        AggregationError, match=r"unknown parameter\(s\) \['ff'\].*\['average_neigh"
    ):
        check_params("krum", 9, {"ff": 1})
    with pytest.raises(AggregationError, match=r"needs parameter\(s\) \['f'\]"):
        check_params("krum", 9, {})
    with pytest.raises(AggregationError, match=r"needs parameter\(s\) \['max_norm'\]"):
        check_params("norm_clip", 9, {})
    with pytest.raises(RegistryError, match="unknown aggregator 'medain'; known: .*median"):
        check_params("medain", 9, {})


def test_accepted_params_lists_defaults_and_required_names():
    assert accepted_params("krum") == {"f": inspect.Parameter.empty, "average_neighbourhood": False}
    assert accepted_params("mean") == {}


def test_rules_check_their_preconditions_at_run_time_too():
    """check_params uses the config's n; the rule re-checks the round's actual n."""
    u = torch.zeros(4, 3)
    with pytest.raises(AggregationError, match="n=4, f=1"):
        AGGREGATORS.get("bulyan")(u, ones(4), f=1)
    with pytest.raises(AggregationError, match="n=4, f=1"):
        AGGREGATORS.get("krum")(u, ones(4), f=1)


# ------------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_updates_are_rejected_naming_the_client(bad):
    u = torch.zeros(4, 3)
    u[2, 1] = bad
    with pytest.raises(AggregationError, match=r"row\(s\) \[2\] contain NaN or Inf"):
        validate_inputs(u, ones(4))


def test_finite_rows_whose_sum_overflows_are_accepted():
    """3e38 + 3e38 overflows fp32 in the row sum, but every entry is finite."""
    u = t([[3e38, 3e38], [0, 0]])
    assert validate_inputs(u, ones(2)).tolist() == [0.5, 0.5]


@pytest.mark.parametrize(
    ("updates", "weights", "match"),
    [
        (torch.zeros(3), ones(3), "2-D"),
        (torch.zeros(3, 2, dtype=torch.float64), ones(3), "float32"),
        (torch.zeros(0, 2), ones(0), "at least one client"),
        (torch.zeros(3, 2), ones(2), r"shape \(3,\)"),
        (torch.zeros(3, 2), torch.tensor([1.0, -1.0, 1.0]), ">= 0"),
        (torch.zeros(3, 2), torch.zeros(3), "sum to 0"),
    ],
)
def test_malformed_inputs_are_rejected(updates, weights, match):
    with pytest.raises(AggregationError, match=match):
        validate_inputs(updates, weights)


def test_zero_weight_selection_raises_instead_of_guessing():
    """Multi-Krum picks c0..c2, which all have size 0: their weighted mean is undefined."""
    with pytest.raises(AggregationError, match="all have weight 0"):
        aggregate("multi_krum", t(KRUM_UPDATES), torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]), f=1, m=3)


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------


def test_pairwise_distances_match_direct_computation_across_chunks(monkeypatch):
    """Gram-based distances over 3-column chunks equal ||x_i - x_j||^2 computed directly in fp64,
    even with a large common offset (which centring removes before the products)."""
    monkeypatch.setattr(base, "_GRAM_CHUNK_ELEMS", 12)
    x = torch.randn(4, 37, generator=torch.Generator().manual_seed(0)) + 1000.0
    direct = torch.cdist(x.double(), x.double()) ** 2
    torch.testing.assert_close(pairwise_sq_distances(x), direct, rtol=1e-4, atol=1e-3)


def test_gram_extra_and_offset_rows():
    """[[1,0],[0,2]] + offset [[1,1],[0,0]] -> rows (2,1), (0,2); extra row (3,0).
    Uncentred Gram: [[5,2,6],[2,4,0],[6,0,9]]."""
    g = gram_matrix(
        t([[1, 0], [0, 2]]),
        center=False,
        offset=t([[1, 1], [0, 0]]),
        extra=torch.tensor([3.0, 0.0]),
    )
    assert g.tolist() == [[5.0, 2.0, 6.0], [2.0, 4.0, 0.0], [6.0, 0.0, 9.0]]


def test_distances_to_a_convex_combination():
    """v = 0.5*(0,0) + 0.5*(4,0) = (2,0); distances to (0,0), (4,0), (2,3) are 2, 2, 3."""
    x = t([[0, 0], [4, 0], [2, 3]])
    dist = distances_to_combination(
        gram_matrix(x), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(dist, torch.tensor([2.0, 2.0, 3.0], dtype=torch.float64))


def _brute_window(col: list[float], lo: int, hi: int) -> list[float]:
    """Reference: each tie class gets (its ranks inside lo..hi) / (its size) per member."""
    out, rank = [0.0] * len(col), 0
    for v in sorted(set(col)):
        members = [i for i, c in enumerate(col) if c == v]
        first, last = rank + 1, rank + len(members)
        share = max(0, min(last, hi) - max(first, lo) + 1) / len(members)
        for i in members:
            out[i] = share
        rank = last
    return out


def test_rank_window_and_order_statistics_on_tie_heavy_data():
    """Order statistics, medians and tie-split window weights agree with a brute force."""
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 8):
        x = torch.randint(0, 4, (n, 12), generator=gen).float()
        ref = x.sort(dim=0).values
        for k in range(1, n + 1):
            assert torch.equal(order_statistic(x, k), ref[k - 1])
        assert torch.equal(column_median(x), (ref[(n - 1) // 2] + ref[n // 2]) / 2)
        for lo in range(1, n + 1):
            for hi in range(lo, n + 1):
                w = rank_window(x, lo, hi)
                expected = [_brute_window(x[:, j].tolist(), lo, hi) for j in range(x.shape[1])]
                torch.testing.assert_close(w, torch.tensor(expected).T)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "bulyan"])
def test_coordinate_wise_rules_do_not_depend_on_chunking(monkeypatch, name):
    """Chunks of 2 columns give the same result as one chunk."""
    u = torch.randn(7, 23, generator=torch.Generator().manual_seed(5))
    params = {"f": 1} if name == "bulyan" else {}
    whole = aggregate(name, u, ones(7), **params)
    monkeypatch.setattr(base, "_CHUNK_ELEMS", 14)
    chunked = aggregate(name, u, ones(7), **params)
    assert torch.equal(whole.aggregate, chunked.aggregate)
    torch.testing.assert_close(whole.client_weights, chunked.client_weights)


def test_trimmed_mean_says_when_its_trim_floors_to_zero():
    """trim_fraction 0.2 of n=4 floors to 0: nothing is cut, the plain mean, said in info."""
    u = torch.tensor([[0.0], [1.0], [2.0], [9.0]])
    res = aggregate("trimmed_mean", u, ones(4), trim_fraction=0.2)
    assert res.aggregate.tolist() == [3.0] and "floors to 0" in res.info["fallback"]
    assert "fallback" not in aggregate("trimmed_mean", u, ones(4), trim=1).info


# ------------------------------------------------------------------------------------------------
# Residual: the vectorised kernel against the previous per-shard torch implementation
# ------------------------------------------------------------------------------------------------


def _reference_median_last(x: torch.Tensor) -> torch.Tensor:
    m = x.shape[-1]
    return x[..., m // 2] if m % 2 else (x[..., m // 2 - 1] + x[..., m // 2]) / 2.0


def _reference_residual(updates, weights, lam=2.0, threshold=0.05, shard_size=2000, tau_eps=1e-7):
    """The residual rule as implemented before the vectorised kernel (kept verbatim as the
    reference): every shard materialises its (s, n, n) slopes and sorts them with torch."""
    p = weights.double() / weights.double().sum()
    n, d = updates.shape
    confidence = torch.zeros(n, dtype=torch.float64)
    fix_cols, fix_rows, fix_vals = [], [], []
    for start in range(0, d, shard_size):
        y = updates[:, start : start + shard_size].T.contiguous()
        s = y.shape[0]
        order = torch.sort(y, dim=1, stable=True)
        ys = order.values
        ranks = torch.empty_like(y)
        ranks.scatter_(1, order.indices, torch.arange(n, dtype=y.dtype).expand(s, n))
        gap = torch.arange(n, dtype=y.dtype)
        gap = gap[:, None] - gap[None, :]
        gap.fill_diagonal_(1.0)
        slopes = (ys[:, :, None] - ys[:, None, :]) / gap
        slopes.diagonal(dim1=1, dim2=2).fill_(math.inf)
        inner = _reference_median_last(torch.sort(slopes, dim=2).values[..., : n - 1])
        slope = _reference_median_last(torch.sort(inner, dim=1).values)
        intercept = _reference_median_last(ys) - slope * (n - 1) / 2.0
        line = intercept[:, None] + slope[:, None] * ranks
        resid = y - line
        spread = _reference_median_last(torch.sort(resid.abs(), dim=1).values[:, 1:])
        e = resid / (1.4826 * (1.0 + 5.0 / (n - 1)) * spread + tau_eps)[:, None]
        leverage = 1.0 / n + (ranks - (n - 1) / 2.0) ** 2 / (n * (n * n - 1) / 12.0)
        k = lam * math.sqrt(2.0 / n)
        z = e.abs() / torch.sqrt(1.0 - leverage)
        w = torch.where(z <= k, 1.0, k / z)
        confidence += (w * w.std(dim=1, keepdim=True)).sum(dim=0, dtype=torch.float64)
        clipped = torch.where(w >= threshold, y, line)
        cols, rows = (clipped != y).nonzero(as_tuple=True)
        fix_cols.append(cols + start)
        fix_rows.append(rows)
        fix_vals.append(clipped[cols, rows] - y[cols, rows])
    top = float(confidence.max())
    if top <= 0.0:
        coeffs = p.float()
    else:
        raw = p * (confidence / top) ** 2
        coeffs = (raw / raw.sum()).float()
    aggregate = coeffs @ updates
    cols, rows, vals = torch.cat(fix_cols), torch.cat(fix_rows), torch.cat(fix_vals)
    aggregate.index_add_(0, cols, vals * coeffs[rows])
    return aggregate, coeffs, confidence, int(cols.numel()) / (n * d)


@pytest.mark.parametrize(
    "n,d,shard_size", [(3, 40, 2000), (4, 9, 4), (6, 300, 64), (11, 257, 100), (50, 120, 2000)]
)
def test_residual_matches_the_previous_implementation(n, d, shard_size):
    """Random rounds with unequal sizes, an outlying minority, tied values and all-zero columns.

    The kernel repeats the reference's float32 operations, so on this machine the results are
    bitwise equal; the assertion allows 1e-6 relative (other CPUs may round torch's vectorised
    sqrt differently in the last bit, which can move a value across the clipping threshold only
    in a measure-zero case).
    """
    gen = torch.Generator().manual_seed(n * 1000 + d)
    u = torch.randn(n, d, generator=gen)
    u[-max(1, n // 5) :] *= 6.0
    u[0, : d // 3] = u[1, : d // 3]  # ties
    u[:, d // 2] = 0.0
    sizes = torch.randint(1, 9, (n,), generator=gen).float()
    agg, coeffs, conf, clipped = _reference_residual(u, sizes, shard_size=shard_size)
    res = aggregate("residual", u, sizes, shard_size=shard_size)
    scale = float(agg.abs().max())
    torch.testing.assert_close(res.aggregate, agg, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(res.client_weights, coeffs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        torch.tensor(res.info["confidence"], dtype=torch.float64), conf, rtol=1e-6, atol=1e-9
    )
    assert res.info["clipped_fraction"] == pytest.approx(clipped, abs=1.0 / (n * d))


# ------------------------------------------------------------------------------------------------
# Column plans: shards and devices give the in-process result
# ------------------------------------------------------------------------------------------------

SPLIT_RULES = [("median", {}), ("trimmed_mean", {"trim": 2}), ("bulyan", {"f": 2}),
               ("residual", {"shard_size": 5})]


def test_shard_bounds_start_at_chunk_multiples():
    """d = 10, width 3 -> 4 chunks [0,3) [3,6) [6,9) [9,10); 3 shards get 2, 1, 1 chunks."""
    assert base.shard_bounds(10, 3, 3) == [(0, 6), (6, 9), (9, 10)]
    assert base.shard_bounds(10, 3, 1) == [(0, 10)]
    assert base.shard_bounds(10, 3, 7) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # only 4 chunks
    assert base.shard_bounds(9, 3, 2) == [(0, 6), (6, 9)]


@pytest.mark.parametrize("name,params", SPLIT_RULES)
def test_shards_give_the_in_process_result_bitwise(monkeypatch, name, params):
    """Every column plan, blocks of 1, 2, 3 and 7 shards (d = 43 is divisible by none), both as
    tensor views and as the row segments a Ray shard receives: aggregate and client weights equal
    bitwise, and info equal."""
    from ray_fedit.federation.sharded import RowBlock

    monkeypatch.setattr(base, "_CHUNK_ELEMS", 44)  # 4 columns per chunk at n = 11
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(11, 43, generator=gen)
    u[-2:] *= 5.0
    u[:, 7] = 0.0  # a tie class across every window edge
    sizes = torch.randint(1, 5, (11,), generator=gen).float()
    whole = aggregate(name, u, sizes, **params)
    plan = base.column_plan(name)
    ctx = plan.prepare(u, sizes, **params)
    width = plan.width(11, ctx)
    for shards in (1, 2, 3, 7):
        bounds = base.shard_bounds(43, width, shards)
        for as_rows in (False, True):
            def block(a, b, as_rows=as_rows):
                return RowBlock([r[a:b] for r in u.numpy()]) if as_rows else u[:, a:b]

            parts = [(a, plan.columns(block(a, b), ctx, width)) for a, b in bounds]
            res = plan.finish(u, sizes, ctx, parts)
            assert torch.equal(res.aggregate, whole.aggregate), (shards, as_rows)
            assert torch.equal(res.client_weights, whole.client_weights), (shards, as_rows)
            assert res.info == whole.info


@pytest.mark.parametrize("name,params", SPLIT_RULES)
@pytest.mark.parametrize("ties", [False, True])
def test_device_step_in_torch_matches_the_cpu_kernels(name, params, ties):
    """The torch step (what runs on CUDA), here on CPU tensors, against the numpy kernels; integer
    values make tie classes cross every window edge. Tolerance: float32 rounding of sums taken in
    another order (1e-5 relative)."""
    gen = torch.Generator().manual_seed(4)
    u = torch.randint(-2, 3, (11, 30), generator=gen).float() if ties else torch.randn(11, 30)
    sizes = torch.arange(1.0, 12.0)
    cpu = aggregate(name, u, sizes, **params)
    dev = base.run_on_device(name, u, sizes, torch.device("cpu"), **params)
    torch.testing.assert_close(dev.aggregate, cpu.aggregate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dev.client_weights, cpu.client_weights, rtol=1e-5, atol=1e-6)


def test_rules_without_a_column_plan_have_no_device_step():
    assert base.column_plan("krum") is None
    with pytest.raises(AggregationError, match="no device step"):
        base.run_on_device("krum", torch.ones(5, 2), ones(5), torch.device("cpu"), f=1)


@pytest.mark.parametrize("cuda", [False, True])
def test_device_setting_resolves_by_rule_and_availability(monkeypatch, cuda):
    """auto -> cuda only with a visible GPU and a rule with a device step; cuda without a GPU or
    for such a rule is an error that says what to set instead."""
    from ray_fedit.federation import sharded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert sharded.resolve_device("cpu", "median").type == "cpu"
    assert sharded.resolve_device("auto", "median").type == ("cuda" if cuda else "cpu")
    assert sharded.resolve_device("auto", "krum").type == "cpu"
    with pytest.raises(AggregationError, match="no device step"):
        sharded.resolve_device("cuda", "krum")
    if cuda:
        assert sharded.resolve_device("cuda", "residual").type == "cuda"
    else:
        with pytest.raises(AggregationError, match="sees no GPU"):
            sharded.resolve_device("cuda", "residual")


@pytest.mark.parametrize("device,cuda,expected", [
    ("cpu", True, "aggregate"), ("auto", False, "aggregate"), ("auto", True, "cuda"),
    ("cuda", True, "cuda"),
])
def test_run_rule_dispatches_by_resolved_device(monkeypatch, device, cuda, expected):
    from ray_fedit.config import AggregatorConfig
    from ray_fedit.federation import sharded

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(sharded, "aggregate", lambda *a, **k: calls.append("aggregate") or
                        AggregationResult(torch.zeros(2), torch.ones(3) / 3, {}))
    monkeypatch.setattr(sharded, "run_on_device", lambda name, u, w, dev, **k: calls.append(
        dev.type) or AggregationResult(torch.zeros(2), torch.ones(3) / 3, {}))
    res = sharded.run_rule(AggregatorConfig(name="median", device=device), "median",
                           torch.ones(3, 2), ones(3))
    assert calls == [expected]
    assert res.info.get("device") == ("cuda" if expected == "cuda" else None)


@pytest.mark.parametrize("fields,needle", [
    ({"name": "krum", "num_shards": 2}, "splits by coordinates"),
    ({"name": "geometric_median", "device": "cuda"}, "device=cuda needs"),
    ({"name": "median", "num_shards": 2, "device": "cuda"}, "choose one"),
])
def test_aggregator_config_rejects_placements_the_rule_cannot_use(fields, needle):
    from pydantic import ValidationError

    from ray_fedit.config import AggregatorConfig

    with pytest.raises(ValidationError, match=needle):
        AggregatorConfig(**fields)
    AggregatorConfig(name="residual", num_shards=4, cpus_per_shard=2.0, device="auto")
    AggregatorConfig(name="krum", device="auto")

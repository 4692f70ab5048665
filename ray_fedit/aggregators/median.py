"""Coordinate-wise median.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498. One of the baselines of the paper
(arXiv 2406.10630, Sec. 6; ``--fed_alg median``).

Rule: for every coordinate ``j``, ``agg_j = median_i(Delta_ij)``; for even ``n`` the mean of the two
middle values (the paper's code calls ``torch.median``, which returns the lower one; the paper only
runs odd ``n = 3``, where both agree).

Assumptions: fewer than half of the clients are Byzantine in every coordinate. Client sizes are
ignored, as in Yin et al. and the paper. ``client_weights[i]`` is the fraction of coordinates whose
median is client ``i``'s value (half a coordinate for each middle value when ``n`` is even; ties
share equally).

The rule is a ``ColumnPlan`` (``ray_fedit.aggregators.base``): its chunks can run in Ray shards
(``ray_fedit.federation.sharded``) or, through ``rank_window_mean_torch``, on a GPU.
"""

from __future__ import annotations

from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    rank_window_plan,
    register_rank_rule,
    validate_inputs,
)


def _window(n: int, _: None = None) -> tuple[int, int]:
    """The ranks averaged: the middle one, or the middle two for even ``n``."""
    return (n + 1) // 2, n // 2 + 1


def _prepare(updates: Tensor, weights: Tensor) -> None:
    validate_inputs(updates, weights)


MEDIAN = rank_window_plan(_prepare, _window)


@register_rank_rule("median", MEDIAN, reduces_to_mean=None)
def median(updates: Tensor, weights: Tensor) -> AggregationResult:
    """Coordinate-wise median of the client updates, in cache-sized column chunks.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes; validated but not used by the rule.

    Returns:
        The median; ``client_weights`` as described in the module docstring.

    Raises:
        AggregationError: invalid inputs.
    """
    return MEDIAN(updates, weights)

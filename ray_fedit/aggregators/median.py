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
"""

from __future__ import annotations

import torch
from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    coordinatewise,
    rank_window_mean,
    validate_inputs,
)
from ray_fedit.registry import AGGREGATORS


@AGGREGATORS.register("median", robust=True, ignores_weights=True, reduces_to_mean=None)
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
    validate_inputs(updates, weights)
    n, d = updates.shape
    out, credit = coordinatewise(
        updates, lambda x: rank_window_mean(x, x, (n + 1) // 2, n // 2 + 1)
    )
    return AggregationResult(out, (credit / d).to(torch.float32), {})

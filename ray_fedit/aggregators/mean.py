"""FedAvg: the example-count-weighted mean of the client updates.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, https://arxiv.org/abs/1602.05629. This is the paper's (arXiv 2406.10630) default
aggregator: ``Delta = sum_i p_i Delta_i`` with ``p_i = N_i / sum_j N_j``.

Assumptions: none about attackers; a single arbitrary update moves the mean arbitrarily far
(breakdown point 0), which is why the contract battery expects it to fail the outlier test.
"""

from __future__ import annotations

from torch import Tensor

from ray_fedit.aggregators.base import AggregationResult, combine, validate_inputs
from ray_fedit.registry import AGGREGATORS


@AGGREGATORS.register("mean", robust=False, ignores_weights=False, reduces_to_mean={})
def mean(updates: Tensor, weights: Tensor) -> AggregationResult:
    """Weighted mean of the client updates (FedAvg).

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` non-negative client sizes; normalised to sum to 1.

    Returns:
        The weighted mean; ``client_weights`` are the normalised weights.

    Raises:
        AggregationError: invalid inputs (see ``validate_inputs``).
    """
    p = validate_inputs(updates, weights)
    return AggregationResult(combine(updates, p), p, {})

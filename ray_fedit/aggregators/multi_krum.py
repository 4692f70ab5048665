"""Multi-Krum: average the ``m`` clients with the best Krum scores.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017 (Sec. 5, "Multi-Krum"),
https://papers.nips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html.

Rule: every client gets its Krum score (sum of squared distances to its ``n - f - 2`` nearest other
clients, computed once on all ``n``); the ``m`` lowest-scoring clients (default ``m = n - f``) are
averaged, weighted by client size. With ``f = 0`` and the default ``m = n`` this is the weighted
mean.

Assumptions: ``n >= 2f + 3`` and ``1 <= m <= n - f``. Ties are broken as in ``krum.krum_order``.
``client_weights`` are the normalised sizes over the selected clients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    combine,
    mean_over,
    pairwise_sq_distances,
    require_int,
    validate_inputs,
)
from ray_fedit.aggregators.krum import check_krum, krum_order, krum_scores
from ray_fedit.errors import AggregationError
from ray_fedit.registry import AGGREGATORS


def resolve_m(n: int, f: int, m: int | None) -> int:
    """The number of clients Multi-Krum averages (default ``n - f``).

    Raises:
        AggregationError: ``n < 2f + 3`` or ``m`` outside ``1..n-f``.
    """
    check_krum(n, f, rule="multi_krum")
    if m is None:
        return n - f
    require_int("multi_krum", "m", m, minimum=1)
    if m > n - f:
        raise AggregationError(
            f"multi_krum: m={m} selects more than n-f={n}-{f}={n - f} clients, so it would have to "
            f"average in suspected attackers; set m <= {n - f} or leave it unset (defaults to n-f)"
        )
    return m


def _check(n: int, params: dict[str, Any]) -> None:
    resolve_m(n, params["f"], params["m"])


@AGGREGATORS.register(
    "multi_krum", check=_check, robust=True, ignores_weights=False, reduces_to_mean={"f": 0}
)
def multi_krum(
    updates: Tensor, weights: Tensor, *, f: int, m: int | None = None
) -> AggregationResult:
    """Weighted mean of the ``m`` clients with the lowest Krum scores.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes, used to weight the selected clients.
        f: assumed number of attackers among the ``n`` clients.
        m: clients to average; default ``n - f``.

    Returns:
        The average; ``info`` holds ``selected`` (client indices) and ``scores``.

    Raises:
        AggregationError: invalid inputs, ``n < 2f + 3`` or ``m > n - f``.
    """
    p = validate_inputs(updates, weights)
    n = updates.shape[0]
    m = resolve_m(n, f, m)
    sq_dist = pairwise_sq_distances(updates)
    scores = krum_scores(sq_dist, n - f - 2)
    chosen = krum_order(scores, sq_dist)[:m]
    selected = torch.zeros(n, dtype=torch.bool)
    selected[chosen] = True
    coeffs = mean_over(p, selected, "multi_krum")
    info = {"selected": sorted(int(i) for i in chosen), "scores": scores.tolist()}
    return AggregationResult(combine(updates, coeffs), coeffs, info)

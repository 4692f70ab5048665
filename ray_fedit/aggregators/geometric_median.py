"""Geometric median (RFA) by the smoothed Weiszfeld algorithm.

Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE Trans. Signal
Processing 2022, https://arxiv.org/abs/1912.13445.

Rule: ``argmin_v sum_i p_i ||v - Delta_i||``, approximated by smoothed Weiszfeld iterations from
the weighted mean: ``beta_i = p_i / max(eps, ||v - Delta_i||)``,
``v = sum_i beta_i Delta_i / sum beta``, until the objective improves by less than ``tol``
(relative) or ``max_iter`` iterations.

Every iterate is a convex combination of the updates, so the iterations run on the ``n``
coefficients with the float64 Gram matrix (one pass over the ``(n, d)`` matrix) and the aggregate is
formed once at the end. Assumptions: fewer than half of the total weight is adversarial
(breakdown point 1/2). ``client_weights`` are the final convex coefficients; ``info`` holds the
iteration count, objective and whether ``tol`` was met.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    centred_gram,
    combine,
    distances_to_combination,
    require_int,
    require_number,
    validate_inputs,
)
from ray_fedit.registry import AGGREGATORS


def _check(n: int, params: dict[str, Any]) -> None:
    require_int("geometric_median", "max_iter", params["max_iter"], minimum=1)
    require_number("geometric_median", "eps", params["eps"], strict=True)
    require_number("geometric_median", "tol", params["tol"])


def weiszfeld(
    gram: Tensor, p: Tensor, *, max_iter: int, eps: float, tol: float
) -> tuple[Tensor, dict[str, Any]]:
    """Smoothed Weiszfeld in coefficient space.

    Args:
        gram: ``(n, n)`` float64 (centred) Gram matrix of the points.
        p: ``(n,)`` point weights summing to 1.

    Returns:
        ``(coefficients (n,) float64 summing to 1, info)``.
    """
    alpha = p.to(torch.float64)
    coeffs = alpha.clone()
    objective = float(alpha @ distances_to_combination(gram, coeffs))
    converged = False
    done = 0
    while done < max_iter and not converged:
        dist = distances_to_combination(gram, coeffs)
        beta = alpha / dist.clamp_min(eps)
        coeffs = beta / beta.sum()
        previous, objective = objective, float(alpha @ distances_to_combination(gram, coeffs))
        converged = abs(previous - objective) <= tol * objective
        done += 1
    return coeffs, {"iterations": done, "objective": objective, "converged": converged}


@AGGREGATORS.register(
    "geometric_median", check=_check, robust=True, ignores_weights=False, reduces_to_mean=None
)
def geometric_median(
    updates: Tensor,
    weights: Tensor,
    *,
    max_iter: int = 100,
    eps: float = 1e-6,
    tol: float = 1e-6,
) -> AggregationResult:
    """Weighted geometric median of the client updates.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes (the ``alpha`` of RFA).
        max_iter: Weiszfeld iterations at most.
        eps: smoothing; distances below it count as ``eps`` (units of the updates).
        tol: stop when the objective's relative improvement is at most this.

    Returns:
        The geometric median; see the module docstring for ``client_weights`` and ``info``.

    Raises:
        AggregationError: invalid inputs or parameters.
    """
    p = validate_inputs(updates, weights)
    _check(updates.shape[0], {"max_iter": max_iter, "eps": eps, "tol": tol})
    coeffs, info = weiszfeld(centred_gram(updates), p, max_iter=max_iter, eps=eps, tol=tol)
    coeffs32 = coeffs.to(torch.float32)
    return AggregationResult(combine(updates, coeffs32), coeffs32, info)

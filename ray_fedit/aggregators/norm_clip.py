"""Norm bounding: clip every update to a maximum L2 norm, then take the weighted mean.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", 2019,
https://arxiv.org/abs/1911.07963 (norm-difference clipping, applied here to the deltas).

Rule: ``Delta = sum_i p_i min(1, max_norm / ||Delta_i||) Delta_i``. With ``max_norm = inf`` it is
the weighted mean.

Assumptions: attacks need large updates (e.g. model replacement scales its delta); honest updates
have norms below ``max_norm``, which must be chosen for the model and learning rate (it is in the
units of the deltas). ``client_weights`` are the coefficients ``p_i min(1, max_norm/||Delta_i||)``,
which sum to at most 1; ``info`` holds the norms and clip factors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ray_fedit.aggregators.base import AggregationResult, combine, require_number, validate_inputs
from ray_fedit.registry import AGGREGATORS


def _check(n: int, params: dict[str, Any]) -> None:
    require_number("norm_clip", "max_norm", params["max_norm"], strict=True)


@AGGREGATORS.register(
    "norm_clip",
    check=_check,
    robust=True,
    ignores_weights=False,
    reduces_to_mean={"max_norm": float("inf")},
)
def norm_clip(updates: Tensor, weights: Tensor, *, max_norm: float) -> AggregationResult:
    """Weighted mean of the updates after clipping each to ``max_norm``.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes.
        max_norm: largest allowed L2 norm of one client's delta.

    Returns:
        The clipped mean; ``info`` holds ``norms`` and ``clip_factors``.

    Raises:
        AggregationError: invalid inputs or ``max_norm <= 0``.
    """
    p = validate_inputs(updates, weights)
    _check(updates.shape[0], {"max_norm": max_norm})
    norms = torch.linalg.vector_norm(updates, dim=1).to(torch.float64)
    factors = torch.where(norms > max_norm, max_norm / norms, 1.0)
    coeffs = (p.to(torch.float64) * factors).to(torch.float32)
    info = {"norms": norms.tolist(), "clip_factors": factors.tolist()}
    return AggregationResult(combine(updates, coeffs), coeffs, info)

"""Centered clipping (CC).

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021,
https://arxiv.org/abs/2012.10333.

Rule: start from ``v_0 = center`` and iterate ``iters`` times
``v_{l+1} = v_l + sum_i p_i (Delta_i - v_l) min(1, tau / ||Delta_i - v_l||)``
(the paper averages with ``1/n``; client sizes generalise that). With ``tau = inf`` one iteration
gives the weighted mean.

The center is the previous round's aggregate (the server momentum of Karimireddy et al.): the
federation keeps it in its state, passes it every round and checkpoints it, so it is runtime state,
never a config parameter (``aggregator.params.center`` is rejected at load). The first round, and a
direct call without ``center``, start from zeros ("no update"); from zeros with ``iters=1`` the rule
is a norm clipping at ``tau``.

Every iterate is an affine combination of the center and the updates, so the iterations run on
``n + 1`` coefficients with the float64 Gram matrix of ``[updates; center]`` and the aggregate is
formed once. Assumptions: the center is close to the honest mean (it is, with momentum), and ``tau``
is of the order of the honest spread (units of the deltas). ``client_weights`` are the coefficients
of the updates; the rest, ``info["center_weight"]``, sits on the center.
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
from ray_fedit.errors import AggregationError
from ray_fedit.registry import AGGREGATORS


def _check(n: int, params: dict[str, Any]) -> None:
    require_number("centered_clipping", "tau", params["tau"], strict=True)
    require_int("centered_clipping", "iters", params["iters"], minimum=1)


@AGGREGATORS.register(
    "centered_clipping",
    check=_check,
    robust=True,
    ignores_weights=False,
    reduces_to_mean={"tau": float("inf")},
    state=("center",),
)
def centered_clipping(
    updates: Tensor,
    weights: Tensor,
    *,
    tau: float,
    iters: int = 1,
    center: Tensor | None = None,
) -> AggregationResult:
    """Centered clipping of the client updates around ``center``.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes.
        tau: clipping radius around the current estimate.
        iters: clipping iterations (``l`` in the paper).
        center: ``(d,)`` starting point; zeros by default.

    Returns:
        The estimate after ``iters`` iterations; ``info`` holds ``center_weight``.

    Raises:
        AggregationError: invalid inputs or parameters, or a ``center`` of the wrong shape.
    """
    p = validate_inputs(updates, weights)
    n, d = updates.shape
    _check(n, {"tau": tau, "iters": iters})
    if center is not None and (center.shape != (d,) or not bool(torch.isfinite(center).all())):
        raise AggregationError(
            f"centered_clipping: center must be a finite tensor of shape ({d},), got "
            f"{tuple(center.shape)}"
        )
    extra = torch.zeros(d, dtype=torch.float32) if center is None else center.to(torch.float32)
    gram = centred_gram(updates, extra=extra)
    alpha = p.to(torch.float64)
    coeffs = torch.zeros(n + 1, dtype=torch.float64)
    coeffs[n] = 1.0
    for _ in range(iters):
        dist = distances_to_combination(gram, coeffs)[:n]
        scale = torch.where(dist > tau, tau / dist, 1.0)
        step = alpha * scale
        coeffs = coeffs * (1.0 - float(step.sum()))
        coeffs[:n] += step
    client = coeffs[:n].to(torch.float32)
    aggregate = combine(updates, client)
    if center is not None:
        aggregate += float(coeffs[n]) * extra
    return AggregationResult(aggregate, client, {"center_weight": float(coeffs[n])})

"""Residual-based reweighting with repeated-median regression (IRLS).

Fu, Xie, Li, Chen, "Attack-Resistant Federated Learning with Residual-based Reweighting", 2019,
https://arxiv.org/abs/1912.11464. A baseline of the paper (arXiv 2406.10630; ``--fed_alg residual``
with ``LAMBDA = 2.0``, ``thresh = 0.05``, shards of 2000 coordinates).

Rule, for every coordinate (``n`` client values ``y``, ranks ``x = 0..n-1`` of those values):

1. Repeated-median line (Siegel): slope ``= med_i med_{j != i} (y_(i) - y_(j)) / (i - j)`` over the
   sorted values, intercept ``= med(y) - slope (n - 1) / 2``; ``line_i = intercept + slope x_i``.
2. Residuals ``r_i = y_i - line_i``, robust scale ``tau = 1.4826 (1 + 5/(n-1)) M + eps`` where
   ``M`` is the median of the ``n - 1`` largest ``|r_i|``; standardised ``e_i = r_i / tau``.
3. Leverage ``h_i = 1/n + (x_i - (n-1)/2)^2 / (n (n^2 - 1) / 12)`` (the hat matrix of ``[1, x]``);
   Huber weight ``w_i = min(1, K sqrt(1 - h_i) / |e_i|)`` with ``K = lam sqrt(2/n)``.
4. Values with ``w_i < threshold`` are replaced by ``line_i`` (clipped to the fitted line).
5. Confidence: ``s_i += w_i * std_j(w_j)`` summed over coordinates (coordinates where the weights
   disagree count more).

Finally the client weights are ``c_i ∝ p_i (s_i / max_j s_j)^2`` (``p`` = client sizes, uniform in
the paper) and the aggregate is ``sum_i c_i y'_i`` over the clipped values ``y'``. If no coordinate
separates the clients at all (every ``s_i = 0``, e.g. identical updates, or any ``n = 3`` round,
where the Huber weights are always 1), the ratio ``s_i / max s`` is 0/0; the rule then trusts
everyone equally (``c = p``) and reports ``info["no_separation"] = True``. The paper's code would
produce NaN there.

Coordinates are independent, so ``shard_size`` only bounds memory (``shard_size * n^2`` floats for
the slopes); it does not change the result. The rule is translation-equivariant, so running on
deltas equals running on full parameters minus the global model. ``tau_eps`` (1e-7 in the paper's
code) is an absolute floor on ``tau``, in the units of the updates.

Assumptions: ``n >= 3``; outliers show up as large residuals coordinate by coordinate. The cost is
``O(n^2 log n)`` per coordinate: fine for the paper's ``n = 3``, about 3 minutes at ``n = 10`` and
an hour or more at ``n >= 50`` for ``d = 16.8M`` on 2 cores (see docs/aggregators.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    combine,
    require_int,
    require_number,
    validate_inputs,
)
from ray_fedit.errors import AggregationError
from ray_fedit.registry import AGGREGATORS


def _check(n: int, params: dict[str, Any]) -> None:
    if n < 3:
        raise AggregationError(
            f"residual needs n >= 3 clients per round for its repeated-median fit; got n={n}. "
            "Sample at least 3 clients or use mean"
        )
    require_number("residual", "lam", params["lam"], strict=True)
    require_number("residual", "threshold", params["threshold"])
    require_int("residual", "shard_size", params["shard_size"], minimum=1)
    require_number("residual", "tau_eps", params["tau_eps"], strict=True)


def _median_last(x: Tensor) -> Tensor:
    """Median along the last dim of an already sorted tensor (mean of the middle two if even)."""
    m = x.shape[-1]
    if m % 2:
        return x[..., m // 2]
    return (x[..., m // 2 - 1] + x[..., m // 2]) / 2.0


def repeated_median_line(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Siegel's repeated-median fit of each row's values against their ranks.

    Args:
        y: ``(s, n)`` values, one row per coordinate, one column per client.

    Returns:
        ``(slope (s,), intercept (s,), ranks (s, n))`` with ranks ``0..n-1`` (stable for ties).
    """
    s, n = y.shape
    order = torch.sort(y, dim=1, stable=True)
    ys = order.values
    ranks = torch.empty_like(y)
    ranks.scatter_(1, order.indices, torch.arange(n, dtype=y.dtype).expand(s, n))
    gap = torch.arange(n, dtype=y.dtype)
    gap = gap[:, None] - gap[None, :]
    gap.fill_diagonal_(1.0)
    slopes = (ys[:, :, None] - ys[:, None, :]) / gap
    # The i == j entry must not count: push it to the end of every sorted row and drop it.
    slopes.diagonal(dim1=1, dim2=2).fill_(math.inf)
    inner = _median_last(torch.sort(slopes, dim=2).values[..., : n - 1])
    slope = _median_last(torch.sort(inner, dim=1).values)
    intercept = _median_last(ys) - slope * (n - 1) / 2.0
    return slope, intercept, ranks


def robust_scale(resid: Tensor, tau_eps: float) -> Tensor:
    """Per row ``tau = 1.4826 (1 + 5/(n-1)) M + tau_eps``, ``M`` = median of the n-1 largest |r|.

    Dropping the smallest absolute residual follows the reference code (with a repeated-median fit
    at least one residual is typically near zero).
    """
    n = resid.shape[1]
    spread = _median_last(torch.sort(resid.abs(), dim=1).values[:, 1:])
    return 1.4826 * (1.0 + 5.0 / (n - 1)) * spread + tau_eps


def residual_shard(
    y: Tensor, lam: float, threshold: float, tau_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Huber weights, confidences and clipped values for a shard of coordinates.

    Args:
        y: ``(s, n)`` values (rows are coordinates).

    Returns:
        ``(weights (s, n), confidence (n,) float64, clipped (s, n))``.
    """
    n = y.shape[1]
    slope, intercept, ranks = repeated_median_line(y)
    line = intercept[:, None] + slope[:, None] * ranks
    resid = y - line
    e = resid / robust_scale(resid, tau_eps)[:, None]
    centre = (n - 1) / 2.0
    leverage = 1.0 / n + (ranks - centre) ** 2 / (n * (n * n - 1) / 12.0)
    root = torch.sqrt(1.0 - leverage)
    k = lam * math.sqrt(2.0 / n)
    z = e.abs() / root
    w = torch.where(z <= k, 1.0, k / z)
    confidence = (w * w.std(dim=1, keepdim=True)).sum(dim=0, dtype=torch.float64)
    clipped = torch.where(w >= threshold, y, line)
    return w, confidence, clipped


def mean_over_scaled(p: Tensor, scale: Tensor) -> Tensor:
    """Normalise ``p * scale`` to sum to 1.

    Raises:
        AggregationError: if every client with a positive confidence has size 0.
    """
    raw = p.to(torch.float64) * scale
    total = float(raw.sum())
    if total <= 0.0:
        raise AggregationError(
            "residual: the clients it trusts all have weight 0; give every client a positive "
            "weight (its example count)"
        )
    return (raw / total).to(torch.float32)


@AGGREGATORS.register(
    "residual", check=_check, robust=True, ignores_weights=False, reduces_to_mean=None
)
def residual(
    updates: Tensor,
    weights: Tensor,
    *,
    lam: float = 2.0,
    threshold: float = 0.05,
    shard_size: int = 2000,
    tau_eps: float = 1e-7,
) -> AggregationResult:
    """Residual-based reweighting over the client updates.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes, multiplied into the final reweighting.
        lam: Huber threshold multiplier (``LAMBDA`` = 2.0 in the paper).
        threshold: Huber weight below which a value is clipped to the line (0.05 in the paper).
        shard_size: coordinates processed at once (memory only).
        tau_eps: absolute floor added to the robust scale.

    Returns:
        The reweighted mean of the clipped values; ``client_weights`` are the final ``c``;
        ``info`` holds ``confidence``, ``clipped_fraction`` and ``no_separation``.

    Raises:
        AggregationError: invalid inputs or parameters (``n < 3``).
    """
    p = validate_inputs(updates, weights)
    n, d = updates.shape
    _check(n, {"lam": lam, "threshold": threshold, "shard_size": shard_size, "tau_eps": tau_eps})
    confidence = torch.zeros(n, dtype=torch.float64)
    # The final weights need every coordinate's confidence first, so the clipped values are kept
    # as a sparse correction (clipped - original) instead of a second (n, d) matrix.
    fix_cols: list[Tensor] = []
    fix_rows: list[Tensor] = []
    fix_vals: list[Tensor] = []
    for start in range(0, d, shard_size):
        y = updates[:, start : start + shard_size].T.contiguous()
        _, conf, clipped = residual_shard(y, lam, threshold, tau_eps)
        confidence += conf
        cols, rows = (clipped != y).nonzero(as_tuple=True)
        if cols.numel():
            fix_cols.append(cols + start)
            fix_rows.append(rows)
            fix_vals.append(clipped[cols, rows] - y[cols, rows])
    top = float(confidence.max())
    no_separation = top <= 0.0
    if no_separation:
        coeffs = p
    else:
        coeffs = mean_over_scaled(p, (confidence / top) ** 2)
    aggregate = combine(updates, coeffs)
    n_fixed = 0
    if fix_cols:
        cols, rows, vals = torch.cat(fix_cols), torch.cat(fix_rows), torch.cat(fix_vals)
        n_fixed = int(cols.numel())
        aggregate.index_add_(0, cols, vals * coeffs[rows])
    info = {
        "confidence": confidence.tolist(),
        "clipped_fraction": n_fixed / (n * d),
        "no_separation": no_separation,
    }
    return AggregationResult(aggregate, coeffs, info)

"""Coordinate-wise trimmed mean.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498. A baseline of the paper (arXiv
2406.10630, Sec. 6; ``--fed_alg trimmedmean`` with ``trimmed_num = 1``).

Rule: for every coordinate, sort the ``n`` values, drop the ``trim`` smallest and the ``trim``
largest, and average the remaining ``n - 2 trim``. ``trim`` is given directly or as
``trim_fraction * n`` (rounded down); with neither, ``trim = 1`` as in the paper's code. With 3
clients and ``trim = 1`` this equals the coordinate-wise median.

Assumptions: at most ``trim`` Byzantine values per coordinate on each side; ``n > 2 trim``. Client
sizes are ignored (Yin et al.). ``client_weights[i]`` is the fraction of the kept slots that client
``i``'s values filled, averaged over coordinates (ties at the cut share equally).

The rule is a ``ColumnPlan`` (``ray_fedit.aggregators.base``): its chunks can run in Ray shards
(``ray_fedit.federation.sharded``) or, through ``rank_window_mean_torch``, on a GPU.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    rank_window_plan,
    register_rank_rule,
    require_int,
    require_number,
    validate_inputs,
)
from ray_fedit.errors import AggregationError

PAPER_TRIM = 1  # FedLLM-Attack's trimmed_num


def resolve_trim(n: int, trim: int | None, trim_fraction: float | None) -> int:
    """The number of values cut from each end for ``n`` clients.

    Raises:
        AggregationError: both or invalid parameters given, or ``2 * trim >= n``.
    """
    if trim is not None and trim_fraction is not None:
        raise AggregationError(
            f"trimmed_mean: give either trim={trim} or trim_fraction={trim_fraction}, not both"
        )
    if trim_fraction is not None:
        frac = require_number("trimmed_mean", "trim_fraction", trim_fraction)
        if frac >= 0.5:
            raise AggregationError(
                f"trimmed_mean: trim_fraction={frac} must be < 0.5 "
                "(it cuts that share from each end)"
            )
        t = math.floor(frac * n)
    else:
        t = PAPER_TRIM if trim is None else require_int("trimmed_mean", "trim", trim)
    if 2 * t >= n:
        raise AggregationError(
            f"trimmed_mean: trim={t} cuts 2*{t}={2 * t} values per coordinate but only n={n} "
            f"clients are aggregated; needs n >= {2 * t + 1}. Lower trim or sample more clients"
        )
    return t


def _check(n: int, params: dict[str, Any]) -> None:
    resolve_trim(n, params["trim"], params["trim_fraction"])


def _prepare(
    updates: Tensor,
    weights: Tensor,
    *,
    trim: int | None = None,
    trim_fraction: float | None = None,
) -> tuple[int, float | None]:
    """Input checks; the context is the resolved trim (and the fraction, for the message)."""
    validate_inputs(updates, weights)
    return resolve_trim(updates.shape[0], trim, trim_fraction), trim_fraction


def _window(n: int, ctx: tuple[int, float | None]) -> tuple[int, int]:
    """The ranks kept: all but the ``trim`` lowest and highest."""
    return ctx[0] + 1, n - ctx[0]


def _info(n: int, ctx: tuple[int, float | None]) -> dict[str, Any]:
    t, trim_fraction = ctx
    info: dict[str, Any] = {"trim": t}
    if t == 0:
        info["fallback"] = (f"trimmed_mean: the trim floors to 0 with n={n} clients "
                            f"(trim_fraction={trim_fraction}), so nothing is cut: the plain mean")
    return info


TRIMMED_MEAN = rank_window_plan(_prepare, _window, _info)


@register_rank_rule("trimmed_mean", TRIMMED_MEAN, check=_check, reduces_to_mean={"trim": 0})
def trimmed_mean(
    updates: Tensor,
    weights: Tensor,
    *,
    trim: int | None = None,
    trim_fraction: float | None = None,
) -> AggregationResult:
    """Coordinate-wise trimmed mean, in cache-sized column chunks.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes; validated but not used by the rule.
        trim: values cut from each end per coordinate (default 1, the paper's ``trimmed_num``).
        trim_fraction: alternatively, the share of ``n`` cut from each end (rounded down).

    Returns:
        The trimmed mean; ``info["trim"]`` is the resolved count.

    Raises:
        AggregationError: invalid inputs or ``2 * trim >= n``.
    """
    return TRIMMED_MEAN(updates, weights, trim=trim, trim_fraction=trim_fraction)

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

import torch
from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    ColumnPart,
    ColumnPlan,
    chunk_part,
    column_chunk_width,
    device_part,
    map_chunks,
    rank_window_mean,
    rank_window_mean_torch,
    stitch,
    validate_inputs,
)
from ray_fedit.registry import AGGREGATORS


def _window(n: int) -> tuple[int, int]:
    """The ranks averaged: the middle one, or the middle two for even ``n``."""
    return (n + 1) // 2, n // 2 + 1


def _prepare(updates: Tensor, weights: Tensor) -> None:
    validate_inputs(updates, weights)


def _columns(block: Tensor, _: None, width: int) -> ColumnPart:
    lo, hi = _window(block.shape[0])
    return chunk_part(map_chunks(block, width, lambda x: rank_window_mean(x, x, lo, hi)))


def _device_columns(block: Tensor, _: None) -> ColumnPart:
    lo, hi = _window(block.shape[0])
    return device_part(block, lambda x: rank_window_mean_torch(x, x, lo, hi))


def _finish(
    updates: Tensor, weights: Tensor, _: None, parts: list[tuple[int, ColumnPart]]
) -> AggregationResult:
    out, credit = stitch(updates.shape[0], parts)
    return AggregationResult(out, (credit / updates.shape[1]).to(torch.float32), {})


MEDIAN = ColumnPlan(
    _prepare, lambda n, _: column_chunk_width(n), _columns, _finish, _device_columns
)


@AGGREGATORS.register(
    "median", robust=True, ignores_weights=True, reduces_to_mean=None, column_plan=MEDIAN
)
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

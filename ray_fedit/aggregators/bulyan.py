"""Bulyan: recursive Krum selection followed by a coordinate-wise trimmed mean around the median.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
ICML 2018, https://arxiv.org/abs/1802.07927.

Rule, with ``f`` assumed attackers:

1. Selection: repeat ``theta = n - 2f`` times: among the clients not yet selected, pick the one with
   the lowest Krum score (sum of squared distances to its ``max(1, n' - f - 2)`` nearest remaining
   clients, ``n'`` = number remaining) and move it to the selection set.
2. Aggregation: for every coordinate, take the ``beta = theta - 2f`` selected values closest to the
   median of the ``theta`` selected values, and average them.

Assumptions: ``n >= 4f + 3``. Client sizes are ignored (as in the paper). With ``f = 0`` every
client is selected and kept, so the rule is the unweighted mean. Score ties in step 1 (the closest
pair always ties once only one neighbour counts) go to the client with the smaller summed squared
distance to the remaining ones (``krum.krum_order``); ties in step 2 share the credit.
``client_weights[i]`` is the fraction of the ``beta`` kept slots that client ``i`` filled, averaged
over coordinates (zero for clients not selected in step 1).

The rule is a ``ColumnPlan`` (``ray_fedit.aggregators.base``): step 1 needs every coordinate and
runs once, in the caller; step 2 is coordinate-wise, and its chunks can run in Ray shards
(``ray_fedit.federation.sharded``) or on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    _window_mean,
    chunked_plan,
    pairwise_sq_distances,
    rank_window_mean,
    rank_window_mean_torch,
    register_rank_rule,
    require_int,
    scratch,
    sorted_columns,
    validate_inputs,
)
from ray_fedit.aggregators.krum import krum_order, krum_scores
from ray_fedit.errors import AggregationError


def check_bulyan(n: int, f: int) -> None:
    """Raise ``AggregationError`` unless ``n >= 4f + 3``."""
    require_int("bulyan", "f", f)
    if n < 4 * f + 3:
        raise AggregationError(
            f"bulyan needs n >= 4f+3 clients per round; got n={n}, f={f} (needs n >= {4 * f + 3}). "
            f"Lower f to at most {max((n - 3) // 4, 0)} or sample more clients"
        )


def _check(n: int, params: dict[str, Any]) -> None:
    check_bulyan(n, params["f"])


def bulyan_selection(sq_dist: Tensor, f: int) -> list[int]:
    """Step 1: the ``n - 2f`` clients chosen by repeated Krum, in the order they were chosen."""
    n = sq_dist.shape[0]
    remaining = list(range(n))
    chosen: list[int] = []
    while len(chosen) < n - 2 * f:
        idx = torch.tensor(remaining)
        sub = sq_dist[idx][:, idx]
        if len(remaining) == 1:
            best = 0
        else:
            scores = krum_scores(sub, max(1, len(remaining) - f - 2))
            best = int(krum_order(scores, sub)[0])
        chosen.append(remaining.pop(best))
    return chosen


def _prepare(updates: Tensor, weights: Tensor, *, f: int) -> tuple[list[int], int]:
    """Input checks and step 1; the context is the chosen clients (in order) and ``beta``."""
    validate_inputs(updates, weights)
    check_bulyan(updates.shape[0], f)
    chosen = bulyan_selection(pairwise_sq_distances(updates), f)
    return chosen, len(chosen) - 2 * f


def _step2_chunk(x: Tensor, rows: np.ndarray, beta: int) -> tuple[Tensor, Tensor]:
    """Step 2 on an ``(n, c)`` chunk: the mean of the ``beta`` selected values nearest the median.

    ``rank_window_mean`` over the distances to the median, without sorting the distances: in a
    sorted column the ``k`` values nearest the median are ``k`` consecutive ones, so the k-th
    smallest distance is the smallest, over windows of ``k`` consecutive sorted values, of the
    larger distance at the window's two ends. Chunks where a tie crosses the window edge (the
    ``beta``-th and the next distance are equal somewhere) take the general path.
    """
    sel = x.numpy()[rows]  # (theta, c) copy of the selected clients' values
    theta, c = sel.shape
    if beta == theta:  # f = 0: every selected value is kept and the median is not needed
        return _credit_rows(rank_window_mean(torch.from_numpy(sel), torch.from_numpy(sel), 1,
                                             beta), rows, x.shape[0])
    srt = sorted_columns(sel, scratch("bulyan_sorted", (theta, c), np.float32))
    med = (srt[(theta - 1) // 2] + srt[theta // 2]) * np.float32(0.5)  # column_median
    dist = np.abs(sel - med)
    gaps = np.abs(srt - med, out=srt)  # the distances in sorted-value order (reuses srt)

    def kth(k: int) -> np.ndarray:
        return np.maximum(gaps[: theta - k + 1], gaps[k - 1 :]).min(axis=0)

    hi = kth(beta)
    sel_t, dist_t = torch.from_numpy(sel), torch.from_numpy(dist)
    if bool((kth(beta + 1) == hi).any()):
        return _credit_rows(rank_window_mean(sel_t, dist_t, 1, beta), rows, x.shape[0])
    inside = np.less_equal(dist, hi, out=scratch("inside", (theta, c), np.bool_))
    return _credit_rows(_window_mean(sel_t, dist_t, srt, inside, 1, beta), rows, x.shape[0])


def _credit_rows(result: tuple[Tensor, Tensor], rows: np.ndarray, n: int) -> tuple[Tensor, Tensor]:
    """The selected clients' credits placed among all ``n`` clients (zero for the others)."""
    mean, part = result
    credit = torch.zeros(n, dtype=torch.float64)
    credit[torch.from_numpy(rows)] = part
    return mean, credit


def _step2_chunk_torch(x: Tensor, rows: Tensor, beta: int) -> tuple[Tensor, Tensor]:
    sel = x[rows]
    theta = sel.shape[0]
    if beta == theta:
        dist = sel
    else:
        srt = sel.sort(dim=0).values
        dist = (sel - (srt[(theta - 1) // 2] + srt[theta // 2]) * 0.5).abs()
    mean, part = rank_window_mean_torch(sel, dist, 1, beta)
    credit = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    credit[rows] = part
    return mean, credit


def _chunk(x: Tensor, ctx: tuple[list[int], int]) -> tuple[Tensor, Tensor]:
    return _step2_chunk(x, np.array(sorted(ctx[0])), ctx[1])


def _device_chunk(x: Tensor, ctx: tuple[list[int], int]) -> tuple[Tensor, Tensor]:
    return _step2_chunk_torch(x, torch.tensor(sorted(ctx[0]), device=x.device), ctx[1])


BULYAN = chunked_plan(
    _prepare, _chunk, _device_chunk, lambda n, ctx: {"selected": sorted(ctx[0])}
)


@register_rank_rule("bulyan", BULYAN, check=_check, reduces_to_mean={"f": 0})
def bulyan(updates: Tensor, weights: Tensor, *, f: int) -> AggregationResult:
    """Bulyan over the client updates.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes; validated but not used by the rule.
        f: assumed number of attackers among the ``n`` clients.

    Returns:
        The aggregate; ``info["selected"]`` lists the ``n - 2f`` clients kept by step 1.

    Raises:
        AggregationError: invalid inputs or ``n < 4f + 3``.
    """
    return BULYAN(updates, weights, f=f)

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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    column_median,
    coordinatewise,
    pairwise_sq_distances,
    rank_window_mean,
    require_int,
    validate_inputs,
)
from ray_fedit.aggregators.krum import krum_order, krum_scores
from ray_fedit.errors import AggregationError
from ray_fedit.registry import AGGREGATORS


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


@AGGREGATORS.register(
    "bulyan", check=_check, robust=True, ignores_weights=True, reduces_to_mean={"f": 0}
)
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
    validate_inputs(updates, weights)
    n, d = updates.shape
    check_bulyan(n, f)
    chosen = bulyan_selection(pairwise_sq_distances(updates), f)
    theta = len(chosen)
    beta = theta - 2 * f
    rows = np.array(sorted(chosen))

    def chunk(x: Tensor) -> tuple[Tensor, Tensor]:
        sel = x.numpy()[rows]  # (theta, c) copy of the selected clients' values
        # With f = 0 every selected value is kept and the median is not needed.
        dist = sel if beta == theta else np.abs(sel - column_median(torch.from_numpy(sel)).numpy())
        mean, part = rank_window_mean(torch.from_numpy(sel), torch.from_numpy(dist), 1, beta)
        credit = torch.zeros(n, dtype=torch.float64)
        credit[index] = part
        return mean, credit

    index = torch.from_numpy(rows)
    out, credit = coordinatewise(updates, chunk)
    return AggregationResult(out, (credit / d).to(torch.float32), {"selected": sorted(chosen)})

"""Divide-and-Conquer (DnC): drop the clients that stick out along the top singular direction.

Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
Defenses for Federated Learning", NDSS 2021, https://doi.org/10.14722/ndss.2021.24498 (Algorithm 2).
A baseline of the paper (arXiv 2406.10630; ``--fed_alg dnc`` with ``niters=1, c=1, b=10000`` and
``m`` = the expected number of attackers, passed here as ``f``).

Rule: repeat ``niters`` times: sample ``b`` coordinates uniformly without replacement (all of them
when ``b >= d``); centre the sampled updates on their mean; take the top right singular vector
``v`` of the centred ``(n, b)`` matrix; score each client by ``((Delta_i - mu) . v)^2``; keep the
``n - floor(c f)`` clients with the lowest scores. The clients kept in every iteration are averaged,
weighted by client size. With ``f = 0`` nobody is removed and the rule is the weighted mean.

Assumptions: attackers' updates deviate along a common direction that dominates the spread;
``floor(c f) < n``. The coordinate sample comes from ``generator``: the federation derives a fresh
one from ``(run seed, round)`` every round (runtime state, never a config parameter), so every round
inspects other coordinates, as the reference ``do_dnc`` resamples on every call, and a round is
reproducible and does not depend on the client order. When ``b < d`` a generator is required. Score ties
go to the lower client index. ``client_weights`` are the normalised sizes over the kept clients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    combine,
    mean_over,
    require_int,
    require_number,
    validate_inputs,
)
from ray_fedit.errors import AggregationError
from ray_fedit.registry import AGGREGATORS


def resolve_removed(n: int, f: int, c: float, niters: int, b: int) -> int:
    """Clients removed per iteration, ``floor(c * f)``.

    Raises:
        AggregationError: invalid parameters or nobody left to average.
    """
    require_int("dnc", "f", f)
    require_int("dnc", "niters", niters, minimum=1)
    require_int("dnc", "b", b, minimum=1)
    removed = math.floor(require_number("dnc", "c", c) * f + 1e-9)
    if removed >= n:
        raise AggregationError(
            f"dnc removes floor(c*f)=floor({c}*{f})={removed} clients per iteration but only n={n} "
            f"are aggregated; needs n >= {removed + 1}. Lower c or f, or sample more clients"
        )
    return removed


def _check(n: int, params: dict[str, Any]) -> None:
    resolve_removed(n, params["f"], params["c"], params["niters"], params["b"])


@AGGREGATORS.register(
    "dnc", check=_check, robust=True, ignores_weights=False, reduces_to_mean={"f": 0},
    state=("generator",),
)
def dnc(
    updates: Tensor,
    weights: Tensor,
    *,
    f: int,
    niters: int = 1,
    c: float = 1.0,
    b: int = 10_000,
    generator: torch.Generator | None = None,
) -> AggregationResult:
    """DnC over the client updates.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes, used to weight the kept clients.
        f: expected number of attackers (``m`` in the DnC paper).
        niters: independent coordinate samples; a client must survive all of them.
        c: filtering fraction; ``floor(c * f)`` clients are removed per iteration.
        b: coordinates sampled per iteration.
        generator: CPU generator for the coordinate sampling (its state advances); required
            when ``b < d``.

    Returns:
        The average of the kept clients; ``info`` holds ``selected`` and the last iteration's
        ``outlier_scores``.

    Raises:
        AggregationError: invalid inputs or parameters, no generator when coordinates must be
            sampled, or no client kept by every iteration.
    """
    p = validate_inputs(updates, weights)
    n, d = updates.shape
    removed = resolve_removed(n, f, c, niters, b)
    if b < d and generator is None:
        raise AggregationError(
            f"dnc samples b={b} of d={d} coordinates and needs a generator for it; the federation "
            "passes one per round (a fixed seed would inspect the same coordinates every round)"
        )
    good = torch.ones(n, dtype=torch.bool)
    scores = torch.zeros(n, dtype=torch.float64)
    for _ in range(niters):
        if b < d:
            cols = torch.randperm(d, generator=generator)[:b].sort().values
            sample = updates.index_select(1, cols).to(torch.float64)
        else:
            sample = updates.to(torch.float64)
        centred = sample - sample.mean(dim=0)
        # The top right singular vector v gives scores (x_i . v)^2 = (sigma_1 u_1i)^2.
        u, s, _ = torch.linalg.svd(centred, full_matrices=False)
        scores = (u[:, 0] * s[0]) ** 2
        kept = torch.zeros(n, dtype=torch.bool)
        kept[torch.sort(scores, stable=True).indices[: n - removed]] = True
        good &= kept
    if not bool(good.any()):
        raise AggregationError(
            f"dnc: no client survived all niters={niters} filtering rounds (each removes {removed} "
            f"of n={n}); lower niters or c"
        )
    coeffs = mean_over(p, good, "dnc")
    info = {"selected": good.nonzero().flatten().tolist(), "outlier_scores": scores.tolist()}
    return AggregationResult(combine(updates, coeffs), coeffs, info)

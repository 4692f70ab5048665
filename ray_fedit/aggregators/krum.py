"""Krum, and the neighbourhood-averaging variant used by the paper's code.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017,
https://papers.nips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html.

Rule (``average_neighbourhood=False``, the original): with ``f`` assumed attackers, client ``i``'s
score is the sum of squared Euclidean distances to its ``n - f - 2`` nearest other clients; the
update with the lowest score is returned as is. Assumes ``n >= 2f + 3`` (Blanchard et al. need
``n > 2f + 2``).

Paper variant (``average_neighbourhood=True``): FedLLM-Attack (arXiv 2406.10630, ``--fed_alg krum``)
scores each client by the sum of plain (not squared) Euclidean distances to its ``n - f - 1``
nearest other clients, picks the lowest score, and returns the average of that client together with
those ``n - f - 1`` neighbours (``n - f`` clients, Multi-Krum-like). Here that average is weighted
by client size (the paper's clients are all the same size, so it matches). It only needs
``n >= f + 2``; the paper runs ``n = 3, f = 1``, where it averages the two closest clients.

Score ties go to the client with the smaller summed squared distance to all others, then to the
lower index (``krum_order``); ties in the neighbourhood distances go to the lower index. Distances
come from the chunked float64 Gram matrix (``base.pairwise_sq_distances``). ``client_weights`` is
one-hot (original) or the normalised sizes over the chosen neighbourhood (variant).
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
from ray_fedit.errors import AggregationError
from ray_fedit.registry import AGGREGATORS


def krum_scores(sq_dist: Tensor, neighbours: int, *, squared: bool = True) -> Tensor:
    """Sum of the distances from each client to its ``neighbours`` nearest other clients.

    Args:
        sq_dist: ``(n, n)`` squared distances with a zero diagonal.
        neighbours: how many nearest other clients count (``n - f - 2`` in Krum).
        squared: sum squared distances (Krum) or plain distances (the paper's variant).

    Returns:
        ``(n,)`` float64 scores.
    """
    dist = sq_dist if squared else sq_dist.sqrt()
    others = dist.clone().fill_diagonal_(float("inf"))
    return others.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


def krum_order(scores: Tensor, sq_dist: Tensor) -> Tensor:
    """Client indices from best to worst Krum score.

    Ties on the score (the two members of the closest pair always tie when only one neighbour
    counts) go to the client with the smaller summed squared distance to all others, then to the
    lower index, so the order does not depend on how clients are numbered unless the geometry
    itself is symmetric.
    """
    by_total = torch.sort(sq_dist.sum(dim=1), stable=True).indices
    return by_total[torch.sort(scores[by_total], stable=True).indices]


def check_krum(n: int, f: int, *, rule: str, average_neighbourhood: bool = False) -> None:
    """Raise ``AggregationError`` unless Krum is defined for ``n`` clients and ``f`` attackers."""
    require_int(rule, "f", f)
    if average_neighbourhood:
        if n < f + 2:
            raise AggregationError(
                f"{rule} (average_neighbourhood=True) needs n >= f+2 clients per round to have a "
                f"neighbour; got n={n}, f={f} (needs n >= {f + 2}). Lower f or sample more clients"
            )
    elif n < 2 * f + 3:
        hint = "; the paper's n=3 setting uses average_neighbourhood=True" if rule == "krum" else ""
        raise AggregationError(
            f"{rule} needs n >= 2f+3 clients per round; got n={n}, f={f} (needs n >= {2 * f + 3}). "
            f"Lower f to at most {max((n - 3) // 2, 0)} or sample more clients{hint}"
        )


def _check(n: int, params: dict[str, Any]) -> None:
    check_krum(n, params["f"], rule="krum", average_neighbourhood=params["average_neighbourhood"])


@AGGREGATORS.register(
    "krum",
    check=_check,
    robust=True,
    ignores_weights=False,
    reduces_to_mean={"f": 0, "average_neighbourhood": True},
)
def krum(
    updates: Tensor, weights: Tensor, *, f: int, average_neighbourhood: bool = False
) -> AggregationResult:
    """Krum (or the paper's neighbourhood average) over the client updates.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes; used only to average the neighbourhood.
        f: assumed number of attackers among the ``n`` clients.
        average_neighbourhood: use the paper's variant (see the module docstring).

    Returns:
        The selected update (or neighbourhood average); ``info`` holds ``selected`` (the chosen
        client), ``neighbourhood`` (the averaged clients) and every client's ``scores``.

    Raises:
        AggregationError: invalid inputs or too few clients for ``f``.
    """
    p = validate_inputs(updates, weights)
    n = updates.shape[0]
    check_krum(n, f, rule="krum", average_neighbourhood=average_neighbourhood)
    sq_dist = pairwise_sq_distances(updates)
    if average_neighbourhood:
        k = n - f - 1
        scores = krum_scores(sq_dist, k, squared=False)
        best = int(krum_order(scores, sq_dist)[0])
        others = sq_dist[best].clone()
        others[best] = -1.0  # the client itself comes first
        chosen = torch.sort(others, stable=True).indices[: k + 1]
    else:
        scores = krum_scores(sq_dist, n - f - 2, squared=True)
        best = int(krum_order(scores, sq_dist)[0])
        chosen = torch.tensor([best])
    selected = torch.zeros(n, dtype=torch.bool)
    selected[chosen] = True
    if average_neighbourhood:
        coeffs = mean_over(p, selected, "krum")
        aggregate = combine(updates, coeffs)
    else:
        coeffs = selected.to(torch.float32)
        aggregate = updates[best].clone()
    info = {
        "selected": best,
        "neighbourhood": sorted(int(i) for i in chosen),
        "scores": scores.tolist(),
    }
    return AggregationResult(aggregate, coeffs, info)

"""FoolsGold: down-weight clients whose updates look too much alike (sybils).

Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020
(arXiv 1808.04866, 2018), https://arxiv.org/abs/1808.04866. The paper (arXiv
2406.10630; ``--fed_alg foolsgold``) runs it per round, without history: that variant is
``foolsgold_stateless``.

Rule, with the standard constants of the FoolsGold reference code:

1. ``cs_ij`` = cosine similarity of clients ``i != j`` (``cs_ii = 0``); ``v_i = max_j cs_ij``.
2. Pardoning: if ``v_i < v_j`` then ``cs_ij *= v_i / v_j``.
3. ``w_i = 1 - max_j cs_ij``, clipped to ``[0, 1]``, divided by ``max_j w_j``; a weight of exactly 1
   becomes 0.99.
4. Logit: ``w_i = kappa * (ln(w_i / (1 - w_i)) + 0.5)`` clipped to ``[0, 1]`` (``ln 0 -> 0``).
5. Aggregate: ``sum_i w_i p_i Delta_i / sum_{j: w_j > 0} p_j`` over the clients with ``w_i > 0``.
   With equal sizes this is the paper's code (mean over kept clients of ``w_i Delta_i``).
   FoolsGold's weights therefore also shrink the step: ``client_weights`` (the coefficients) sum
   to the size-weighted mean of ``w`` over kept clients, at most 1.

If every client looks like a sybil of another (``max_j w_j = 0``, e.g. identical updates) all
weights are 0 and the aggregate is the zero update; ``info["all_sybil"]`` records it and
``info["fallback"]`` says so. The reference code would divide by zero there.

``history``: FoolsGold (Fung et al., Algorithm 1) compares clients' *accumulated* updates. The
federation keeps each client's sum of the updates it sent in earlier rounds (runtime state in the
federation state and its checkpoints, ``O(registered clients x d)`` memory, only for this rule) and
passes the sampled clients' rows as ``history`` (``(n, d)``); similarities are computed on
``history + updates``. ``foolsgold_stateless`` is the paper code's per-round variant: the same
function without history.

Assumptions: colluding attackers (sybils) send similar updates while honest clients differ. By
design it penalises a tight honest cluster and trusts isolated outliers, so the contract battery
exempts it from the fixed-point and outlier-minority checks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    combine,
    gram_matrix,
    require_number,
    validate_inputs,
)
from ray_fedit.errors import AggregationError
from ray_fedit.registry import AGGREGATORS


def _check(n: int, params: dict[str, Any]) -> None:
    require_number("foolsgold", "kappa", params["kappa"], strict=True)


def foolsgold_weights(cos: Tensor, kappa: float = 1.0) -> Tensor:
    """FoolsGold's per-client weights in ``[0, 1]`` from an ``(n, n)`` cosine-similarity matrix."""
    n = cos.shape[0]
    cs = cos.clone().fill_diagonal_(0.0)
    maxcs = cs.max(dim=1).values
    # Pardoning: scale cs_ij down by maxcs_i / maxcs_j where client j looks more sybil-like.
    pardon = maxcs[:, None] < maxcs[None, :]
    ratio = maxcs[:, None] / torch.where(pardon, maxcs[None, :], 1.0)
    cs = torch.where(pardon & ~torch.eye(n, dtype=torch.bool), cs * ratio, cs)
    wv = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    top = float(wv.max())
    if top == 0.0:
        return torch.zeros(n, dtype=torch.float64)
    wv = wv / top
    wv = torch.where(wv == 1.0, 0.99, wv)
    logit = kappa * (torch.log(wv / (1.0 - wv)) + 0.5)  # log(0) = -inf, clipped to 0 below
    return torch.nan_to_num(logit, neginf=0.0).clamp(0.0, 1.0)


# Identical updates are perfect sybils (all weights 0), and a tight honest cluster is down-weighted
# while an isolated outlier is trusted: both by design, so both variants are exempt from those checks.
_META: dict[str, Any] = {"check": _check, "robust": True, "ignores_weights": False,
                         "reduces_to_mean": None, "exempt": ("fixed_point", "outlier_minority")}


@AGGREGATORS.register("foolsgold", **_META, state=("history",))
def foolsgold(
    updates: Tensor,
    weights: Tensor,
    *,
    kappa: float = 1.0,
    history: Tensor | None = None,
) -> AggregationResult:
    """FoolsGold over the client updates.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes, combined with the FoolsGold weights.
        kappa: confidence of the logit step (1 in FoolsGold).
        history: optional ``(n, d)`` accumulated past updates of the same clients.

    Returns:
        The aggregate; ``info`` holds the FoolsGold weights ``wv`` and ``all_sybil``.

    Raises:
        AggregationError: invalid inputs, or a ``history`` of the wrong shape.
    """
    p = validate_inputs(updates, weights)
    _check(updates.shape[0], {"kappa": kappa})
    if history is not None and (history.shape != updates.shape or history.dtype != torch.float32):
        raise AggregationError(
            f"foolsgold: history must be a float32 tensor of shape {tuple(updates.shape)}, got "
            f"{history.dtype} {tuple(history.shape)}"
        )
    gram = gram_matrix(updates, center=False, offset=history)
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    # A zero vector has no direction: its similarity to everything is 0 (as F.normalize gives).
    safe = torch.where(norms > 0, norms, 1.0)
    cos = (gram / safe[:, None] / safe[None, :]).clamp(-1.0, 1.0)
    wv = foolsgold_weights(cos, kappa)
    kept = wv > 0
    coeffs = torch.zeros_like(p)
    if bool(kept.any()):
        kept_size = float(p[kept].sum())
        if kept_size <= 0.0:
            raise AggregationError(
                f"foolsgold: the clients it trusts {kept.nonzero().flatten().tolist()} all have "
                "weight 0; give every client a positive weight (its example count)"
            )
        coeffs = (wv * p.to(torch.float64) / kept_size).to(torch.float32)
    info: dict[str, Any] = {"wv": wv.tolist(), "all_sybil": not bool(kept.any())}
    if info["all_sybil"]:
        info["fallback"] = ("foolsgold: every client looks like a sybil of another (all weights 0), "
                            "so the round's aggregate is the zero update")
    return AggregationResult(combine(updates, coeffs), coeffs, info)


@AGGREGATORS.register("foolsgold_stateless", **_META)
def foolsgold_stateless(updates: Tensor, weights: Tensor, *, kappa: float = 1.0
                        ) -> AggregationResult:
    """FoolsGold on this round's updates alone, as the paper's code runs it (no history).

    Args and returns as :func:`foolsgold`.
    """
    return foolsgold(updates, weights, kappa=kappa)

"""Checks and metrics over client updates: pure functions, no Ray.

A round aggregates only updates that pass :func:`validate_update`; the others are left out, and the
round's record names each with its reason. Validation runs in client-id order, and the stacked
matrix keeps that order, so aggregation never depends on which task finished first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ray_fedit.federation.state import ClientUpdate


def validate_update(
    client_id: int,
    update: Any,
    *,
    dim: int,
    sampled: Sequence[int],
    num_clients: int,
    needs_state: bool = False,
) -> str | None:
    """Why an update must be rejected, or None if it may be aggregated.

    Args:
        client_id: the client the update claims to come from.
        update: what the task returned (a :class:`ClientUpdate`).
        dim: the adapter length the codec expects.
        sampled: the clients sampled this round.
        num_clients: registered clients (ids are ``range(num_clients)``).
        needs_state: whether the algorithm requires a new client state (SCAFFOLD).

    Returns:
        A one-line reason (unknown or unsampled client, malformed update, wrong length or dtype,
        non-finite values), or None.
    """
    if not 0 <= client_id < num_clients:
        return f"unknown client {client_id} (registered: 0..{num_clients - 1})"
    if client_id not in set(sampled):
        return f"client {client_id} was not sampled this round"
    if not isinstance(update, ClientUpdate):
        return f"malformed update of type {type(update).__name__}"
    arrays = [("delta", update.delta)]
    if needs_state:
        arrays.append(("state", update.state))
    for name, arr in arrays:
        if not isinstance(arr, np.ndarray):
            return f"{name} is {type(arr).__name__}, not a numpy array"
        if arr.dtype != np.float32:
            return f"{name} has dtype {arr.dtype}, expected float32"
        if arr.shape != (dim,):
            return f"{name} has shape {arr.shape}, expected ({dim},)"
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            return f"{name} has {bad} non-finite values (NaN/Inf)"
    if not isinstance(update.n_examples, int) or update.n_examples <= 0:
        return f"n_examples={update.n_examples!r} is not a positive int"
    return None


def aggregation_weights(updates: Sequence[ClientUpdate], mode: str) -> np.ndarray:
    """Per-client weights handed to the aggregation rule (it normalizes them).

    ``openfedllm``: the client's dataset size (``stats["shard_size"]``), the paper code's
    ``sample_num_list``. Otherwise: the example slots trained this round (``n_examples``), equal for
    every client that ran the same steps, so FedAvg is the plain mean.
    """
    if mode == "openfedllm":
        return np.array([u.stats["shard_size"] for u in updates], dtype=np.float32)
    return np.array([u.n_examples for u in updates], dtype=np.float32)


def scaffold_control(control: np.ndarray, control_deltas: Sequence[np.ndarray],
                     client_weights: np.ndarray, *, sampled_share: float) -> np.ndarray:
    """SCAFFOLD's server control after a round: ``c + (|S| / N) * sum_i a_i (c_i+ - c_i)``.

    Karimireddy et al. (2020) average the clients' control deltas with equal weights; here ``a`` is
    the aggregation rule's own trust in each client (``AggregationResult.client_weights``,
    normalised to sum to 1), so a client that Krum, DnC or FoolsGold leaves out cannot move the
    server control either, and with the mean the rule is the paper's. When the rule trusts nobody
    (all weights 0) the control stays as it is.

    Args:
        control: the server control ``c``, fp32 ``(d,)``.
        control_deltas: ``c_i+ - c_i`` of the aggregated clients, in the rule's row order.
        client_weights: the rule's ``(n,)`` client weights.
        sampled_share: ``|S| / N``, the aggregated clients over all registered clients.

    Returns:
        The new fp32 control.
    """
    a = np.asarray(client_weights, dtype=np.float64)
    total = float(a.sum())
    if total <= 0.0:
        return control.copy()
    dc = np.tensordot(a / total, np.stack(control_deltas).astype(np.float64), axes=1)
    return (control + np.float32(sampled_share) * dc.astype(np.float32)).astype(np.float32)


def client_metrics(deltas: np.ndarray, aggregate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2 norm of each delta and its cosine to the aggregate (0 where a norm is 0), in float64."""
    d = deltas.astype(np.float64)
    a = aggregate.astype(np.float64)
    norms = np.linalg.norm(d, axis=1)
    a_norm = float(np.linalg.norm(a))
    denom = norms * a_norm
    cos = np.divide(d @ a, denom, out=np.zeros_like(norms), where=denom > 0)
    return norms, cos


def jsonable(value: Any) -> Any:
    """Tensors, arrays and numpy scalars as plain JSON values (for round records)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, np.ndarray, np.generic
        return jsonable(value.tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN/Inf

    return value

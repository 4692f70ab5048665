"""Server optimizers applied to the aggregated client delta (Reddi et al., 2021).

"Adaptive Federated Optimization", ICLR 2021, arxiv.org/abs/2003.00295, Algorithm 2. The aggregate
``delta`` (the robust rule's output over client deltas ``local - global``) is a pseudo-gradient
step; the server moves the global adapter ``x`` with it:

- ``none`` (FedAvg): ``x += eta * delta``; with ``server_lr = 1`` this is plain FedAvg.
- ``fedavgm`` (Hsu et al., 2019): ``m = mu * m + delta``; ``x += eta * m``.
- ``fedadagrad``: ``m = b1 * m + (1 - b1) * delta``; ``v = v + delta^2``.
- ``fedadam``:    ``m`` as above; ``v = b2 * v + (1 - b2) * delta^2``.
- ``fedyogi``:    ``m`` as above; ``v = v - (1 - b2) * delta^2 * sign(v - delta^2)``.
- adaptive ones then step ``x += eta * m / (sqrt(v) + tau)``, with ``m`` starting at 0 and ``v`` at
  ``tau^2`` (Algorithm 2: ``v_{-1} >= tau^2``), and no bias correction.

FedAdagrad with ``server_beta1 = 0`` is OpenFedLLM's momentum-free variant. All maths is fp32
numpy on flat vectors (the adapter codec's layout); the state is a dict of named arrays so
checkpoints store it with safetensors, never pickle. Pure functions: no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

ServerOptimizer = Literal["none", "fedavgm", "fedadagrad", "fedadam", "fedyogi"]
ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")


@dataclass(frozen=True)
class ServerOptConfig:
    """Hyper-parameters of the server optimizer (``federation.server_*`` in the config)."""

    name: ServerOptimizer = "none"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


@dataclass
class ServerOptState:
    """The optimizer's arrays (``m``, ``v``; none for FedAvg) and its step count."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    steps: int = 0


def init_state(cfg: ServerOptConfig, dim: int) -> ServerOptState:
    """The state before the first step: ``m = 0`` (and ``v = tau^2`` for adaptive ones)."""
    arrays: dict[str, np.ndarray] = {}
    if cfg.name != "none":
        arrays["m"] = np.zeros(dim, dtype=np.float32)
    if cfg.name in ADAPTIVE:
        arrays["v"] = np.full(dim, cfg.tau**2, dtype=np.float32)
    return ServerOptState(arrays=arrays, steps=0)


def server_step(
    cfg: ServerOptConfig, state: ServerOptState, x: np.ndarray, delta: np.ndarray
) -> tuple[np.ndarray, ServerOptState]:
    """One server step: the new global vector and the new state (inputs are not modified).

    Args:
        cfg: which optimizer and its hyper-parameters.
        state: the state from :func:`init_state` or the previous step.
        x: the global adapter (fp32, shape ``(d,)``).
        delta: the aggregated client delta (fp32, shape ``(d,)``).

    Returns:
        ``(x_new, state_new)``.
    """
    x = np.asarray(x, dtype=np.float32)
    delta = np.asarray(delta, dtype=np.float32)
    eta = np.float32(cfg.lr)
    if cfg.name == "none":
        return x + eta * delta, ServerOptState(arrays={}, steps=state.steps + 1)
    m = state.arrays["m"]
    if cfg.name == "fedavgm":
        m = np.float32(cfg.momentum) * m + delta
        return x + eta * m, ServerOptState(arrays={"m": m}, steps=state.steps + 1)
    b1, b2 = np.float32(cfg.beta1), np.float32(cfg.beta2)
    one = np.float32(1.0)
    m = b1 * m + (one - b1) * delta
    v, d2 = state.arrays["v"], delta * delta
    if cfg.name == "fedadagrad":
        v = v + d2
    elif cfg.name == "fedadam":
        v = b2 * v + (one - b2) * d2
    else:  # fedyogi
        v = v - (one - b2) * d2 * np.sign(v - d2)
    x_new = x + eta * m / (np.sqrt(v) + np.float32(cfg.tau))
    return x_new.astype(np.float32), ServerOptState(arrays={"m": m, "v": v}, steps=state.steps + 1)

"""Federated instruction tuning on Ray: the driver actor, trainer workers and the maths they use.

Public API::

    from ray_fedit.federation import ClientSpec, FederationResult, run_federation
    result = run_federation(cfg, run_dir, clients, eval_hook=None, resume=False)

``sft``, ``sampling``, ``server_opt``, ``updates``, ``state`` and ``checkpoint`` import without Ray;
the Ray-based names (``run_federation``, ``start_federation``, ``FederationDriver``,
``TrainerWorker``, ``WorkerPool``) are loaded on first access, so importing this package does
not import Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from ray_fedit.federation.state import (
    ClientSpec,
    ClientTask,
    ClientUpdate,
    FederationResult,
    FederationState,
)

_LAZY = {
    "run_federation": "ray_fedit.federation.driver",
    "start_federation": "ray_fedit.federation.driver",
    "FederationDriver": "ray_fedit.federation.driver",
    "TrainerWorker": "ray_fedit.federation.worker",
    "WorkerPool": "ray_fedit.federation.pool",
}

__all__ = [
    "ClientSpec",
    "ClientTask",
    "ClientUpdate",
    "FederationDriver",
    "FederationResult",
    "FederationState",
    "TrainerWorker",
    "WorkerPool",
    "run_federation",
    "start_federation",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ray_fedit.federation' has no attribute {name!r}")

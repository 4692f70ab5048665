"""Attacks, registered in ``ray_fedit.registry.ATTACKS`` with a ``kind`` in their metadata.

Two kinds, applied at two explicit points of a run and never looking at the defense (STYLE.md L8):

* ``kind="update"``: transforms of the clients' flat deltas just before aggregation,
  ``(deltas, malicious_mask, *, generator, **params) -> deltas`` (``ray_fedit.attacks.update``).
* ``kind="data"``: transforms of a malicious client's dataset when partitions are built (the paper's
  safety attack: train on unaligned data).
"""

from __future__ import annotations

# --- update-space attacks -------------------------------------------------------------------------
from ray_fedit.attacks import update  # noqa: F401  (registers the update-space attacks)
from ray_fedit.attacks.update import (
    InsufficientReference,
    apply_update_attack,
    check_update_attack_feasible,
    check_update_attack_params,
)

# --- data-space attacks ---------------------------------------------------------------------------
# (registered by ray_fedit.attacks.data; import it here once that module exists)

__all__ = [
    "InsufficientReference",
    "apply_update_attack",
    "check_update_attack_feasible",
    "check_update_attack_params",
]

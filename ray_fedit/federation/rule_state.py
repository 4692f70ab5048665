"""The state robust aggregation rules keep across rounds, owned by the federation.

Three rules are stateful (``ray_fedit.aggregators.state_params`` lists what each keeps):

- ``centered_clipping``: ``center`` = the previous round's aggregate (Karimireddy et al., 2021,
  clip around the server momentum); zeros before the first round.
- ``foolsgold``: ``history`` = each client's sum of the updates it sent in earlier rounds (Fung et
  al., 2020, Algorithm 1); the sampled clients' rows are passed, zeros for a client's first round.
  Memory is ``O(clients ever sampled x d)`` fp32, kept only when this rule is chosen.
- ``dnc``: ``generator`` = a fresh torch generator derived from ``(run seed, round)``, so every round
  samples other coordinates; nothing to keep.

The state lives in ``FederationState.rule`` and in every checkpoint (``server_state.safetensors``,
keys ``rule.center`` and ``rule.history.<client>``), so a resumed run continues bitwise. Pure
functions over numpy and torch: no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ray_fedit.aggregators import state_params
from ray_fedit.federation.sampling import NO_CLIENT, derive_seed

_CENTER = "rule.center"
_HISTORY = "rule.history."


@dataclass
class RuleState:
    """What the stateful rules carry from round to round.

    Attributes:
        center: centered clipping's center (the previous aggregate), or None before round 1.
        history: client id -> the sum of that client's past updates (FoolsGold).
    """

    center: np.ndarray | None = None
    history: dict[int, np.ndarray] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as named fp32 arrays for a safetensors checkpoint."""
        out = {} if self.center is None else {_CENTER: np.ascontiguousarray(self.center)}
        out.update({f"{_HISTORY}{c}": np.ascontiguousarray(h)
                    for c, h in sorted(self.history.items())})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> RuleState:
        """The state stored by :meth:`to_arrays` (other keys are ignored)."""
        history = {int(k.removeprefix(_HISTORY)): np.asarray(v, dtype=np.float32)
                   for k, v in arrays.items() if k.startswith(_HISTORY)}
        center = arrays.get(_CENTER)
        return cls(center=None if center is None else np.asarray(center, dtype=np.float32),
                   history=history)


def round_state(rule: str, state: RuleState, *, client_ids: Sequence[int], dim: int, seed: int,
                round_index: int) -> dict[str, Any]:
    """The state keyword arguments of ``rule`` for one round's aggregation.

    Args:
        rule: the registered aggregator name.
        state: the federation's rule state.
        client_ids: the aggregated clients, in the row order of the update matrix.
        dim: the adapter's length.
        seed: the run's seed.
        round_index: 0-based round.

    Returns:
        ``{}`` for stateless rules; else e.g. ``{"center": Tensor[d]}``.
    """
    wanted = state_params(rule)
    out: dict[str, Any] = {}
    if "center" in wanted:
        center = np.zeros(dim, np.float32) if state.center is None else state.center
        out["center"] = torch.from_numpy(center)
    if "history" in wanted:
        zeros = np.zeros(dim, np.float32)
        out["history"] = torch.from_numpy(np.stack([state.history.get(c, zeros)
                                                    for c in client_ids]))
    if "generator" in wanted:
        out["generator"] = torch.Generator().manual_seed(
            derive_seed(seed, round_index, NO_CLIENT, f"aggregator:{rule}"))
    return out


def advance(rule: str, state: RuleState, *, client_ids: Sequence[int], updates: Tensor,
            aggregate: Tensor) -> None:
    """Fold one round into the state: the new center, the clients' accumulated updates.

    Args:
        rule: the registered aggregator name.
        state: updated in place.
        client_ids: the aggregated clients, in the row order of ``updates``.
        updates: ``(n, d)`` fp32, the updates the server received (after any update attack).
        aggregate: ``(d,)`` the rule's output this round.
    """
    wanted = state_params(rule)
    if "center" in wanted:
        state.center = aggregate.numpy().astype(np.float32, copy=True)
    if "history" in wanted:
        rows = updates.numpy()
        for i, c in enumerate(client_ids):
            past = state.history.get(c)
            state.history[c] = rows[i].copy() if past is None else past + rows[i]

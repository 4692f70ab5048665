"""Inner-product manipulation (IPM).

Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
Manipulation", UAI 2019 (PMLR 115, 2020), https://arxiv.org/abs/1903.03936.

Rule: every attacker sends ``-epsilon * mu`` where ``mu`` is the mean of the reference updates
(the honest ones by default), so the aggregate's inner product with the honest mean shrinks or turns
negative. The paper uses a small ``epsilon`` (0.1) against median-like rules and a large one (100)
against Krum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ray_fedit.attacks.update.base import replace_from_reference
from ray_fedit.registry import ATTACKS


@ATTACKS.register("ipm", kind="update", min_reference=1)
def ipm(
    deltas: Tensor,
    malicious_mask: Tensor,
    *,
    generator: torch.Generator,
    epsilon: float = 0.5,
    knowledge: str = "benign",
) -> Tensor:
    """Return a copy of ``deltas`` whose malicious rows are ``-epsilon * mean(reference)``.

    Args:
        deltas: ``(n, d)`` client deltas.
        malicious_mask: ``(n,)`` bool, True for attackers.
        generator: unused (the attack is deterministic); part of the common signature.
        epsilon: scale of the negated mean.
        knowledge: ``"benign"`` (default), ``"malicious"`` or ``"all"``.

    Raises:
        ConfigError: no reference updates.
    """
    return replace_from_reference("ipm", deltas, malicious_mask, knowledge,
                                  lambda ref: -epsilon * ref.mean(dim=0))

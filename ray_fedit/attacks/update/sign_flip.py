"""Sign flipping: attackers send their delta times ``-scale``.

A standard Byzantine baseline, e.g. Damaskinos et al., "AGGREGATHOR", SysML 2019, and
Allen-Zhu et al., "Byzantine-Resilient Non-Convex Stochastic Gradient Descent", ICLR 2021
(https://arxiv.org/abs/2012.14368).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ray_fedit.attacks.update.base import check_inputs, with_rows
from ray_fedit.registry import ATTACKS


@ATTACKS.register("sign_flip", kind="update")
def sign_flip(
    deltas: Tensor, malicious_mask: Tensor, *, generator: torch.Generator, scale: float = 1.0
) -> Tensor:
    """Return a copy of ``deltas`` with every malicious row multiplied by ``-scale``.

    Args:
        deltas: ``(n, d)`` client deltas.
        malicious_mask: ``(n,)`` bool, True for attackers.
        generator: unused (the attack is deterministic); part of the common signature.
        scale: magnitude of the flipped delta relative to the honest one.
    """
    check_inputs("sign_flip", deltas, malicious_mask)
    return with_rows(deltas, malicious_mask, deltas[malicious_mask] * -scale)

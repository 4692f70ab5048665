"""Scaling (model replacement): attackers multiply their own delta by ``factor``.

Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated Learning", AISTATS 2020,
https://arxiv.org/abs/1807.00459. Model replacement scales the malicious delta by about
``n / eta`` so that it survives averaging; here the factor is a parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ray_fedit.attacks.update.base import check_inputs, with_rows
from ray_fedit.registry import ATTACKS


@ATTACKS.register("scaling", kind="update")
def scaling(
    deltas: Tensor, malicious_mask: Tensor, *, generator: torch.Generator, factor: float = 10.0
) -> Tensor:
    """Return a copy of ``deltas`` with every malicious row multiplied by ``factor``.

    Args:
        deltas: ``(n, d)`` client deltas.
        malicious_mask: ``(n,)`` bool, True for attackers.
        generator: unused (the attack is deterministic); part of the common signature.
        factor: multiplier of the malicious deltas.
    """
    check_inputs("scaling", deltas, malicious_mask)
    return with_rows(deltas, malicious_mask, deltas[malicious_mask] * factor)

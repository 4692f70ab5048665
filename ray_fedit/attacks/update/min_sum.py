"""Min-sum attack (AGR-agnostic).

Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
Defenses for Federated Learning", NDSS 2021, https://doi.org/10.14722/ndss.2021.24498.

Rule: every attacker sends ``mu - gamma dev`` with the largest ``gamma`` such that the sum of its
squared distances to the reference updates is at most the smallest such sum of any reference
update (see ``perturbation.py`` for ``dev`` and the search). References are the honest updates
by default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ray_fedit.attacks.update.base import check_inputs, reference_rows, with_rows
from ray_fedit.attacks.update.perturbation import optimise
from ray_fedit.registry import ATTACKS


@ATTACKS.register("min_sum", kind="update")
def min_sum(
    deltas: Tensor,
    malicious_mask: Tensor,
    *,
    generator: torch.Generator,
    perturbation: str = "unit_vec",
    gamma_init: float = 10.0,
    tol: float = 1e-5,
    knowledge: str = "benign",
) -> Tensor:
    """Return a copy of ``deltas`` whose malicious rows are the min-sum update.

    Args:
        deltas: ``(n, d)`` client deltas.
        malicious_mask: ``(n,)`` bool, True for attackers.
        generator: unused (the attack is deterministic); part of the common signature.
        perturbation: ``"unit_vec"``, ``"std"`` or ``"sign"``.
        gamma_init: first ``gamma`` tried (10 in the reference code).
        tol: bisection tolerance on ``gamma``.
        knowledge: ``"benign"`` (default), ``"malicious"`` or ``"all"``.

    Raises:
        ConfigError: bad parameters or too few reference updates.
    """
    check_inputs("min_sum", deltas, malicious_mask)
    if not bool(malicious_mask.any()):
        return deltas.clone()
    ref = reference_rows("min_sum", deltas, malicious_mask, knowledge)
    mal, _ = optimise("min_sum", ref, perturbation, gamma_init, tol, "sum")
    return with_rows(deltas, malicious_mask, mal)

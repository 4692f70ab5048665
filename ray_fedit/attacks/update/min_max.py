"""Min-max attack (AGR-agnostic).

Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
Defenses for Federated Learning", NDSS 2021, https://doi.org/10.14722/ndss.2021.24498.

Rule: every attacker sends ``mu - gamma dev`` with the largest ``gamma`` such that its largest
distance to any reference update is at most the largest distance between two reference updates
(see ``perturbation.py`` for ``dev`` and the search). References are the honest updates by default.
"""

from __future__ import annotations

from ray_fedit.attacks.update.perturbation import gamma_attack
from ray_fedit.registry import ATTACKS

# Signature and parameters: see ``perturbation.gamma_attack``.
min_max = ATTACKS.register("min_max", kind="update", min_reference=2)(
    gamma_attack("min_max", "max"))

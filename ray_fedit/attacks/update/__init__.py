"""Update-space attacks: transforms of the clients' flat deltas applied just before aggregation.

Each attack is one module registered in ``ATTACKS`` with ``kind="update"`` and the signature
``(deltas, malicious_mask, *, generator, **params) -> deltas``. Benign rows come back bitwise
unchanged, the input is never modified, and the output depends only on the inputs and
``generator``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

# Importing an attack module registers it; keep one line per attack.
from ray_fedit.attacks.update import (  # noqa: F401
    alie,
    gaussian_noise,
    ipm,
    min_max,
    min_sum,
    scaling,
    sign_flip,
)
from ray_fedit.attacks.update.base import (
    KNOWLEDGE,
    InsufficientReference,
    min_reference,
    reference_count,
)
from ray_fedit.errors import ConfigError
from ray_fedit.registry import ATTACKS

__all__ = [
    "InsufficientReference",
    "apply_update_attack",
    "check_update_attack_feasible",
    "check_update_attack_params",
]

_COMMON = {"generator"}


def check_update_attack_params(name: str, params: Mapping[str, Any]) -> None:
    """Reject an unknown update attack, a data attack, or parameter names the attack lacks.

    Raises:
        RegistryError: unknown attack name (the message lists the known ones).
        ConfigError: a data-space attack, or unknown parameter names.
    """
    fn = ATTACKS.get(name)
    kind = ATTACKS.meta(name).get("kind")
    if kind != "update":
        raise ConfigError(
            f"attack {name!r} is a {kind!r} attack; only kind='update' attacks transform deltas"
        )
    accepted = {
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _COMMON
    }
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(
            f"attack {name!r} got unknown parameter(s) {unknown}; it accepts {sorted(accepted)}"
        )
    if "knowledge" in params and params["knowledge"] not in KNOWLEDGE:
        raise ConfigError(f"attack {name!r}: knowledge={params['knowledge']!r} must be one of "
                          f"{list(KNOWLEDGE)}")


def _knowledge(name: str, params: Mapping[str, Any]) -> str:
    default = inspect.signature(ATTACKS.get(name)).parameters.get("knowledge")
    return str(params.get("knowledge", default.default if default is not None else "all"))


def check_update_attack_feasible(name: str, params: Mapping[str, Any], *, clients_per_round: int,
                                 malicious_per_round: tuple[int, int]) -> None:
    """Refuse an attack that can never have enough reference updates under this sampling.

    Args:
        name: the update attack.
        params: its parameters (``knowledge`` picks the reference updates).
        clients_per_round: clients aggregated per round.
        malicious_per_round: the fewest and most malicious clients a round can sample.

    Raises:
        ConfigError: when no round with an attacker in it has ``min_reference`` reference updates
            (e.g. ALIE with knowledge=benign and one benign client per round). Rounds that fall
            short only sometimes are handled per round (``attack.update.on_too_few_references``).
    """
    need = min_reference(name)
    lo, hi = malicious_per_round
    if need == 0 or hi == 0:
        return
    knowledge = _knowledge(name, params)
    best = max(reference_count(knowledge, benign=clients_per_round - m, malicious=m)
               for m in range(max(lo, 1), hi + 1))
    if best < need:
        raise ConfigError(
            f"attack {name!r} needs {need} reference updates per round but knowledge={knowledge!r} "
            f"gives at most {best} with clients_per_round={clients_per_round} and "
            f"{lo}-{hi} malicious clients per round, so it could never run; sample more clients or "
            "change attack.update.params.knowledge"
        )


def apply_update_attack(
    name: str,
    deltas: Tensor,
    malicious_mask: Tensor,
    generator: torch.Generator,
    **params: Any,
) -> Tensor:
    """Run the update-space attack registered as ``name``.

    Args:
        name: registered attack name, e.g. ``"alie"``.
        deltas: ``(n, d)`` client deltas of this round.
        malicious_mask: ``(n,)`` bool, True for the attackers among them.
        generator: CPU generator derived from ``(seed, round)``.
        **params: the attack's parameters.

    Returns:
        A new ``(n, d)`` tensor; benign rows are bitwise copies of ``deltas``.

    Raises:
        RegistryError: unknown attack name.
        ConfigError: not an update attack, unknown parameters, or an attack-specific problem.
    """
    check_update_attack_params(name, params)
    return ATTACKS.get(name)(deltas, malicious_mask, generator=generator, **params)

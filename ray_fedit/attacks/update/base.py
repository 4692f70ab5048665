"""Shared pieces of the update-space attacks: input checks and the attacker's reference statistics.

An update-space attack is a pure function

    attack(deltas: Tensor[n, d], malicious_mask: BoolTensor[n], *, generator, **params)
        -> Tensor[n, d]

that returns a new tensor whose benign rows are bitwise copies of the input and whose malicious rows
are replaced. Randomness comes only from ``generator``. Attacks never see which aggregator runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ray_fedit.errors import ConfigError
from ray_fedit.registry import ATTACKS

KNOWLEDGE = ("benign", "malicious", "all")


class InsufficientReference(ConfigError):
    """A round has fewer reference updates than the attack needs (e.g. one benign client).

    Under uniform sampling such rounds happen in most long runs; the federation then applies the
    ``attack.update.on_too_few_references`` policy instead of stopping.
    """


def min_reference(name: str) -> int:
    """Reference updates attack ``name`` needs per round (0: it needs none)."""
    return int(ATTACKS.meta(name).get("min_reference", 0))


def reference_count(knowledge: str, *, benign: int, malicious: int) -> int:
    """How many reference updates ``knowledge`` selects in a round of that composition."""
    return {"benign": benign, "malicious": malicious}.get(knowledge, benign + malicious)


def check_inputs(name: str, deltas: Tensor, malicious_mask: Tensor) -> None:
    """Raise ``ConfigError`` unless ``deltas`` is floating ``(n, d)`` and the mask bool ``(n,)``."""
    if not isinstance(deltas, Tensor) or deltas.ndim != 2 or not deltas.is_floating_point():
        raise ConfigError(f"{name}: deltas must be a 2-D floating tensor (n_clients, d)")
    n = deltas.shape[0]
    if (
        not isinstance(malicious_mask, Tensor)
        or malicious_mask.dtype != torch.bool
        or tuple(malicious_mask.shape) != (n,)
    ):
        raise ConfigError(f"{name}: malicious_mask must be a bool tensor of shape ({n},)")


def reference_rows(name: str, deltas: Tensor, malicious_mask: Tensor, knowledge: str) -> Tensor:
    """The updates the attacker computes its statistics from.

    Args:
        knowledge: ``"benign"`` (omniscient: the honest clients' updates, the usual evaluation
            setting), ``"malicious"`` (only the attackers' own honestly trained updates, as in
            Baruch et al.), or ``"all"``.

    Raises:
        ConfigError: unknown ``knowledge`` or no rows to learn from.
    """
    if knowledge not in KNOWLEDGE:
        raise ConfigError(f"{name}: knowledge={knowledge!r} must be one of {KNOWLEDGE}")
    rows = {"benign": ~malicious_mask, "malicious": malicious_mask}.get(
        knowledge, torch.ones_like(malicious_mask)
    )
    if not bool(rows.any()):
        raise InsufficientReference(
            f"{name}: knowledge={knowledge!r} selects no client this round; use knowledge='all' or "
            "make sure the round has both benign and malicious clients"
        )
    return deltas[rows]


def need_rows(name: str, ref: Tensor, minimum: int, why: str) -> None:
    """Raise ``InsufficientReference`` if the reference set has fewer than ``minimum`` rows."""
    if ref.shape[0] < minimum:
        raise InsufficientReference(
            f"{name}: needs at least {minimum} reference updates for {why}, got {ref.shape[0]}; "
            "use knowledge='benign' or 'all', or sample more clients"
        )


def with_rows(deltas: Tensor, malicious_mask: Tensor, rows: Tensor) -> Tensor:
    """A copy of ``deltas`` whose malicious rows are ``rows`` (``(k, d)`` or one ``(d,)`` row)."""
    out = deltas.clone()
    if bool(malicious_mask.any()):
        out[malicious_mask] = rows.to(deltas.dtype)
    return out


def replace_from_reference(name: str, deltas: Tensor, malicious_mask: Tensor, knowledge: str,
                           craft: Callable[[Tensor], Tensor]) -> Tensor:
    """The skeleton of the attacks that craft their rows from reference statistics.

    Checks the inputs, returns an unchanged copy when no client is malicious, and otherwise
    replaces the malicious rows with ``craft(reference_rows(...))``, after checking that the
    reference set has the attack's registered ``min_reference`` rows.

    Raises:
        InsufficientReference: fewer reference rows than the attack needs.
    """
    check_inputs(name, deltas, malicious_mask)
    if not bool(malicious_mask.any()):
        return deltas.clone()
    ref = reference_rows(name, deltas, malicious_mask, knowledge)
    need_rows(name, ref, min_reference(name), "its reference statistics")
    return with_rows(deltas, malicious_mask, craft(ref))

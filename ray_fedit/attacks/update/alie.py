"""A Little Is Enough (ALIE / LIE).

Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed Learning",
NeurIPS 2019, https://arxiv.org/abs/1902.06156.

Rule: every attacker sends ``mu + z sigma`` where ``mu`` and ``sigma`` are the coordinate-wise mean
and (unbiased) standard deviation of the reference updates. Unless ``z`` is given it follows the
paper from the round's ``n`` clients and ``f`` attackers: ``s = floor(n/2 + 1) - f`` honest
supporters are needed for a majority, and ``z = Phi^{-1}((n - s) / n)``, e.g. ``n = 5, f = 1`` gives
``s = 2`` and ``z = Phi^{-1}(0.6) = 0.2533``. A negative ``z`` shifts the other way.

``knowledge`` picks the reference updates: ``"benign"`` (omniscient; default, so that a round with a
single attacker still has a spread), ``"malicious"`` (the attackers' own honest updates, as in the
paper), or ``"all"``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ray_fedit.attacks.update.base import replace_from_reference
from ray_fedit.errors import ConfigError
from ray_fedit.registry import ATTACKS


def alie_z(n: int, f: int) -> float:
    """The paper's ``z_max`` for ``n`` clients of which ``f`` are attackers.

    Raises:
        ConfigError: when ``(n - s) / n`` is not in (0, 1), i.e. no finite ``z`` exists.
    """
    s = math.floor(n / 2 + 1) - f
    q = (n - s) / n
    if not 0.0 < q < 1.0:
        raise ConfigError(
            f"alie: with n={n} clients and f={f} attackers, s=floor(n/2+1)-f={s} gives "
            f"Phi^-1({q:.3f}), which is not finite; pass z explicitly"
        )
    # Phi^-1(q) = sqrt(2) erfinv(2q - 1); avoids importing torch.distributions (seconds).
    return math.sqrt(2.0) * float(torch.erfinv(torch.tensor(2.0 * q - 1.0, dtype=torch.float64)))


@ATTACKS.register("alie", kind="update", min_reference=2)
def alie(
    deltas: Tensor,
    malicious_mask: Tensor,
    *,
    generator: torch.Generator,
    z: float | None = None,
    knowledge: str = "benign",
) -> Tensor:
    """Return a copy of ``deltas`` whose malicious rows are ``mu + z sigma``.

    Args:
        deltas: ``(n, d)`` client deltas.
        malicious_mask: ``(n,)`` bool, True for attackers.
        generator: unused (the attack is deterministic); part of the common signature.
        z: shift in standard deviations; default from ``n`` and ``f`` as in the paper.
        knowledge: which updates ``mu`` and ``sigma`` come from (see the module docstring).

    Raises:
        ConfigError: fewer than 2 reference updates, or no finite default ``z``.
    """
    def craft(ref: Tensor) -> Tensor:
        shift = alie_z(deltas.shape[0], int(malicious_mask.sum())) if z is None else z
        std, mean = torch.std_mean(ref, dim=0)
        return mean + shift * std

    return replace_from_reference("alie", deltas, malicious_mask, knowledge, craft)

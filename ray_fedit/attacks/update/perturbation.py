"""The optimisation shared by the min-max and min-sum attacks (Shejwalkar & Houmansadr 2021).

Both send ``mal = mu - gamma * dev``, where ``mu`` is the mean of the reference updates and ``dev``
a perturbation direction (``unit_vec``: ``mu / ||mu||``; ``sign``: ``sign(mu)``; ``std``: the
coordinate-wise standard deviation), and search for the largest ``gamma`` whose malicious update
still looks like an honest one by the attack's distance criterion. The search is the reference
code's: start at ``gamma_init``, step ``gamma_init / 2``, move up on success and down on failure,
halve the step, stop when the last success and the current ``gamma`` differ by at most ``tol``.

Distances to the candidate are a quadratic in ``gamma``:
``||x_j - mu + gamma dev||^2 = a_j + 2 gamma b_j + gamma^2 c`` with ``a_j = ||x_j - mu||^2``,
``b_j = <x_j - mu, dev>``, ``c = ||dev||^2``, so the search costs ``O(n)`` per step after one pass
over the updates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ray_fedit.aggregators.base import gram_matrix, sq_distances_from_gram
from ray_fedit.attacks.update.base import need_rows, replace_from_reference
from ray_fedit.errors import ConfigError

PERTURBATIONS = ("unit_vec", "std", "sign")


def deviation(name: str, ref: Tensor, mu: Tensor, perturbation: str) -> Tensor:
    """The perturbation direction ``dev`` (float32, shape ``(d,)``).

    Raises:
        ConfigError: unknown type, ``std`` with one reference update, or ``unit_vec`` with
            ``mu = 0``.
    """
    if perturbation == "unit_vec":
        norm = float(torch.linalg.vector_norm(mu))
        if norm == 0.0:
            raise ConfigError(
                f"{name}: the reference mean is zero, so perturbation='unit_vec' has no direction; "
                "use perturbation='std' or 'sign'"
            )
        return mu / norm
    if perturbation == "sign":
        return torch.sign(mu)
    if perturbation == "std":
        need_rows(name, ref, 2, "perturbation='std'")
        return ref.std(dim=0)
    raise ConfigError(f"{name}: perturbation={perturbation!r} must be one of {PERTURBATIONS}")


def search_gamma(ok: Callable[[float], bool], gamma_init: float, tol: float) -> float:
    """The reference code's bisection for the largest ``gamma`` with ``ok(gamma)`` (0 if none)."""
    gamma, step, best = gamma_init, gamma_init / 2.0, 0.0
    while abs(best - gamma) > tol:
        if ok(gamma):
            best = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2.0
    return best


def optimise(
    name: str,
    ref: Tensor,
    perturbation: str,
    gamma_init: float,
    tol: float,
    criterion: str,
) -> tuple[Tensor, float]:
    """Return ``(mu - gamma * dev, gamma)`` for the ``"max"`` (min-max) or ``"sum"`` (min-sum) test.

    ``"max"``: the largest distance from the malicious update to a reference update is at most the
    largest pairwise distance among the reference updates. ``"sum"``: its summed squared distance to
    the reference updates is at most the smallest such sum of any reference update.
    """
    if not (gamma_init > 0 and tol > 0):
        raise ConfigError(f"{name}: gamma_init={gamma_init} and tol={tol} must be > 0")
    ref32 = ref.to(torch.float32)
    mu = ref32.mean(dim=0)
    dev = deviation(name, ref32, mu, perturbation).to(torch.float32)
    gram = gram_matrix(ref32, center=True)  # rows centred on mu
    pair = sq_distances_from_gram(gram)
    a = gram.diagonal()
    b = (ref32 @ dev).to(torch.float64) - float(mu @ dev)
    c = float(dev.to(torch.float64) @ dev.to(torch.float64))
    if criterion == "max":
        bound = float(pair.max())

        def ok(gamma: float) -> bool:
            return float((a + 2 * gamma * b + gamma * gamma * c).max()) <= bound

    else:
        bound = float(pair.sum(dim=1).min())

        def ok(gamma: float) -> bool:
            return float((a + 2 * gamma * b + gamma * gamma * c).sum()) <= bound

    gamma = search_gamma(ok, gamma_init, tol)
    return mu - gamma * dev, gamma


def gamma_attack(name: str, criterion: str) -> Callable[..., Tensor]:
    """The update attack ``name`` that sends :func:`optimise`'s ``mu - gamma * dev`` for ``criterion``.

    Min-max and min-sum differ only in the criterion (``"max"`` or ``"sum"``); each registers the
    function returned here under its own name.
    """

    def attack(
        deltas: Tensor,
        malicious_mask: Tensor,
        *,
        generator: torch.Generator,
        perturbation: str = "unit_vec",
        gamma_init: float = 10.0,
        tol: float = 1e-5,
        knowledge: str = "benign",
    ) -> Tensor:
        """Return a copy of ``deltas`` whose malicious rows are the attack's ``mu - gamma * dev``.

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
        return replace_from_reference(
            name, deltas, malicious_mask, knowledge,
            lambda ref: optimise(name, ref, perturbation, gamma_init, tol, criterion)[0])

    attack.__name__ = attack.__qualname__ = name
    return attack

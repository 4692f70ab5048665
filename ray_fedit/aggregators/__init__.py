"""Aggregation rules: pure functions over an ``(n_clients, d)`` float32 tensor of LoRA deltas.

Each rule lives in its own module, registers itself in ``ray_fedit.registry.AGGREGATORS`` and
returns an ``AggregationResult``. Look rules up by name::

    from ray_fedit.aggregators import aggregate, check_params
    check_params("krum", n=10, params={"f": 2})              # at config load time
    result = aggregate("krum", updates, n_examples, f=2)     # each round

See docs/aggregators.md for the list of rules, their parameters and citations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

# Importing a rule module registers it; keep one line per rule.
from ray_fedit.aggregators import (  # noqa: F401
    bulyan,
    centered_clipping,
    dnc,
    foolsgold,
    geometric_median,
    krum,
    mean,
    median,
    multi_krum,
    norm_clip,
    residual,
    trimmed_mean,
)
from ray_fedit.aggregators.base import (
    AggregationResult,
    AggregatorFn,
    accepted_params,
    check_params,
    state_params,
)
from ray_fedit.errors import AggregationError
from ray_fedit.registry import AGGREGATORS

__all__ = [
    "AGGREGATORS",
    "AggregationResult",
    "AggregatorFn",
    "accepted_params",
    "aggregate",
    "check_params",
    "state_params",
]


def aggregate(name: str, updates: Tensor, weights: Tensor, *,
              state: Mapping[str, Any] | None = None, **params: Any) -> AggregationResult:
    """Run the aggregator registered as ``name`` after checking its parameters.

    Args:
        name: registered rule name, e.g. ``"median"``.
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` non-negative client sizes.
        state: the rule's federation state for this round (``center``, ``history``,
            ``generator``; see :func:`state_params`), passed by the federation driver.
        **params: the rule's keyword settings.

    Raises:
        RegistryError: unknown rule name.
        AggregationError: bad parameters, state the rule does not keep, or bad inputs (see
            ``check_params`` and the rule).
    """
    # A malformed ``updates`` is reported by the rule's own input check, with its real shape.
    n = updates.shape[0] if isinstance(updates, Tensor) and updates.ndim == 2 else 1
    check_params(name, max(int(n), 1), params)
    state = dict(state or {})
    extra = sorted(set(state) - set(state_params(name)))
    if extra:
        raise AggregationError(f"aggregator {name!r} keeps no state {extra}; it keeps "
                               f"{list(state_params(name)) or 'none'}")
    return AGGREGATORS.get(name)(updates, weights, **params, **state)

"""Where an aggregation rule runs: in the driver, on coordinate shards as Ray tasks, or on a GPU.

``run_rule(cfg.aggregator, name, updates, weights, **params)`` is the one entry point. It reads
``aggregator.num_shards``, ``cpus_per_shard`` and ``device``:

- ``num_shards == 1`` and the device resolves to ``cpu``: ``ray_fedit.aggregators.aggregate`` in
  this process, exactly as without this module.
- ``num_shards > 1``: the rule's ``ColumnPlan`` (``ray_fedit.aggregators.base``). ``prepare``
  (input checks, parameters, Bulyan's Krum selection) runs here; the columns are cut into
  ``num_shards`` ranges that start at multiples of the plan's chunk width; each range goes to the
  object store as its ``n`` row segments (written straight from the update matrix, no staging
  copy) and one Ray task per range, reserving ``cpus_per_shard`` CPUs, runs the plan's ``columns``
  step on it; ``finish`` stitches the parts here. A shard computes exactly the chunks the whole
  matrix would, and the per-chunk sums are added in column order, so the aggregate, the client
  weights and ``info`` are bitwise those of the in-process rule, for any shard count. ``info``
  gains ``shards`` (the number of ranges used).
- device ``cuda`` (or ``auto`` with CUDA present and a rule that has a column plan): the plan's
  torch step on the GPU in this process (``ray_fedit.aggregators.base.run_on_device``); equal to
  the CPU result to float32 rounding. ``info`` gains ``device``.

Which rules split: those registered with a ``column_plan`` (median, trimmed mean, Bulyan's
coordinate-wise second step, residual's per-coordinate fit); ``AggregatorConfig`` refuses
``num_shards > 1`` or ``device=cuda`` for the others at load. Pairwise rules (Krum, Multi-Krum,
geometric median, centered clipping, FoolsGold, DnC) and Bulyan's selection need all coordinates
of all clients at once and stay in the driver, on CPU.

Ray is imported only when shards are used, so the module (and the CUDA path) imports without Ray.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ray_fedit.aggregators import AggregationResult, aggregate, check_params
from ray_fedit.aggregators.base import (
    ColumnPart,
    column_plan,
    run_on_device,
    scratch,
    shard_bounds,
)
from ray_fedit.config import AggregatorConfig
from ray_fedit.errors import AggregationError

__all__ = ["RowBlock", "resolve_device", "run_rule", "run_sharded", "shard_columns"]


def resolve_device(setting: str, name: str) -> torch.device:
    """The device rule ``name`` runs on for ``aggregator.device = setting``.

    ``auto`` is CUDA when this process sees a GPU and the rule has a device step, else the CPU.

    Raises:
        AggregationError: ``cuda`` without a visible GPU, or for a rule without a device step.
    """
    plan = column_plan(name)
    capable = plan is not None and plan.device_columns is not None
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "auto":
        return torch.device("cuda" if capable and torch.cuda.is_available() else "cpu")
    if not capable:
        raise AggregationError(
            f"aggregator.device=cuda: {name!r} has no device step; use device=cpu or auto"
        )
    if not torch.cuda.is_available():
        raise AggregationError(
            "aggregator.device=cuda but this process sees no GPU (torch.cuda.is_available() is "
            "False); use device=auto or cpu, or run the driver where a GPU is visible"
        )
    return torch.device("cuda")


def run_rule(
    agg_cfg: AggregatorConfig,
    name: str,
    updates: Tensor,
    weights: Tensor,
    *,
    state: Mapping[str, Any] | None = None,
    **params: Any,
) -> AggregationResult:
    """Aggregate one round with rule ``name``, placed as ``agg_cfg`` says (see the module doc).

    Args:
        agg_cfg: the run's ``aggregator`` section (``num_shards``, ``cpus_per_shard``, ``device``).
        name: registered rule name (normally ``agg_cfg.name``).
        updates: ``(n, d)`` float32 client deltas on the CPU.
        weights: ``(n,)`` client sizes.
        state: the rule's federation state, passed to ``aggregate`` (rules with a column plan keep
            none).
        **params: the rule's keyword settings (``RunConfig.aggregator_params()``).

    Returns:
        The rule's result; the aggregate and client weights are on the CPU.

    Raises:
        AggregationError: bad parameters or inputs, state for a rule that keeps none, or a
            placement the rule or the process cannot honour.
        RayError: a shard task failed (its error is chained).
    """
    device = resolve_device(agg_cfg.device, name)
    if agg_cfg.num_shards == 1 and device.type == "cpu":
        return aggregate(name, updates, weights, state=state, **params)
    if state:
        raise AggregationError(f"aggregator {name!r} keeps no state {sorted(state)}")
    if agg_cfg.num_shards == 1:
        res = run_on_device(name, updates, weights, device, **params)
        return AggregationResult(res.aggregate, res.client_weights, {**res.info, "device": "cuda"})
    return run_sharded(name, updates, weights, agg_cfg.num_shards, agg_cfg.cpus_per_shard,
                       **params)


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------


class RowBlock:
    """A shard's ``(n, c)`` columns held as ``n`` row segments (read-only object-store views).

    Supports what a plan's ``columns`` step uses: ``shape`` and ``block[:, a:b]``, which gathers
    the chunk into a per-thread scratch buffer (the chunk's values, contiguous). The kernels read
    a chunk only while they process it, so the buffer can be reused by the next chunk.
    """

    def __init__(self, rows: list[np.ndarray]) -> None:
        self.rows = rows
        self.shape = (len(rows), int(rows[0].shape[0]))

    def __getitem__(self, key: tuple[slice, slice]) -> Tensor:
        _, cols = key
        width = len(range(*cols.indices(self.shape[1])))
        out = scratch("row_block", (self.shape[0], width), np.float32)
        for i, row in enumerate(self.rows):
            out[i] = row[cols]
        return torch.from_numpy(out)


def shard_columns(
    name: str, rows: list[np.ndarray], context: Any, width: int, threads: int
) -> ColumnPart:
    """The body of a shard task: rule ``name``'s ``columns`` step on one range of columns."""
    torch.set_num_threads(threads)
    plan = column_plan(name)
    with warnings.catch_warnings():
        # The row segments are read-only views of the object store; the kernels never write them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return plan.columns(RowBlock(rows), context, width)  # type: ignore[union-attr]


_REMOTE: dict[str, Any] = {}


def _remote_shard_columns() -> Any:
    if "task" not in _REMOTE:
        import ray

        _REMOTE["task"] = ray.remote(shard_columns)
    return _REMOTE["task"]


def run_sharded(
    name: str,
    updates: Tensor,
    weights: Tensor,
    num_shards: int,
    cpus_per_shard: float = 1.0,
    **params: Any,
) -> AggregationResult:
    """Rule ``name`` on ``num_shards`` column ranges as Ray tasks (also for ``num_shards == 1``:
    one task), stitched here; bitwise the in-process result. Needs ``ray.init`` to have run.

    Raises:
        AggregationError: the rule has no column plan, bad parameters or inputs.
        RayError: a shard task failed.
    """
    import ray

    plan = column_plan(name)
    if plan is None:
        raise AggregationError(
            f"aggregator.num_shards={num_shards}: {name!r} does not split by coordinates"
        )
    n, d = updates.shape
    check_params(name, n, params)
    context = plan.prepare(updates, weights, **params)  # validates the inputs
    width = plan.width(n, context)
    bounds = shard_bounds(d, width, num_shards)
    matrix = updates.numpy()
    task = _remote_shard_columns().options(num_cpus=cpus_per_shard)
    threads = max(1, int(cpus_per_shard))
    # Each shard is put and submitted before the next is written, so the first tasks start early.
    refs = [
        task.remote(name, ray.put([row[a:b] for row in matrix]), context, width, threads)
        for a, b in bounds
    ]
    parts = [(a, part) for (a, _), part in zip(bounds, ray.get(refs), strict=True)]
    res = plan.finish(updates, weights, context, parts)
    return AggregationResult(res.aggregate, res.client_weights, {**res.info, "shards": len(bounds)})

"""What a run asks Ray for, and a fail-fast check that the cluster can ever give it.

The trainer workers of a run are gang-scheduled with one placement group: one bundle per worker,
``{"CPU": cpus_per_worker, "GPU": gpus_per_worker}``, placed with ``resources.placement_strategy``.
The driver asks for CPU only. A request the cluster can never satisfy (more GPUs per worker than any
node has, STRICT_SPREAD over more nodes than exist, ...) fails at once with a :class:`ResourceError`
that names what was asked and what the cluster has, instead of hanging on a pending placement group.
A request that fits the cluster but not its free resources right now waits for the placement group
up to a timeout (the second line of defense), then fails the same way.

The planning functions are pure (no Ray import); :func:`cluster_nodes`,
:func:`acquire_worker_placement` and :meth:`WorkerPlacement.release` talk to a running Ray.

Example (what the federation engine does)::

    placement = acquire_worker_placement(cfg.resources)          # checks, reserves, waits
    workers = [TrainerWorker.options(**placement.worker_options(i)).remote(...)
               for i in range(placement.num_workers)]
    driver = FederationDriver.options(**driver_options()).remote(...)
    ...
    placement.release()

Inside a Ray Tune trial (``ray-fedit sweep``) the trial reserves the workers' bundles first
(:func:`ray_fedit.sweeps.trial_bundles`, with an empty head bundle: the trial's own process and
the driver reserve nothing); the same :func:`acquire_worker_placement` call then places the
workers in bundles 0..n-1 of the trial's placement group instead of creating a second one (which
would wait for resources the trial holds).
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray_fedit.errors import RayFeditError

if TYPE_CHECKING:  # pragma: no cover
    from ray.util.placement_group import PlacementGroup

    from ray_fedit.config import ResourcesConfig

log = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
GPU_SHARING_WARNING = "Ray does not isolate GPU memory"
DEFAULT_PLACEMENT_TIMEOUT_S = 600.0
_EPS = 1e-6
_SEARCH_BUDGET = 200_000  # DFS steps of the bin-packing check before it gives the benefit of doubt
_HIDDEN_KEYS = ("node:", "accelerator_type:")
_GROUP_KEY = re.compile(r"_group_(\d+_)?[0-9a-f]{16,}$")  # a placement group's internal resources
_BYTE_KEYS = ("memory", "object_store_memory")

Bundle = dict[str, float]


class ResourceError(RayFeditError):
    """A resource request that the cluster cannot (or did not in time) satisfy."""


class GpuSharingWarning(UserWarning):
    """Several trainer workers share one GPU; Ray does not isolate GPU memory between them."""


# ------------------------------------------------------------------------------- what a run asks
def worker_resources(res: ResourcesConfig) -> Bundle:
    """One trainer worker's bundle: ``{"CPU": cpus_per_worker}``, plus ``"GPU"`` when it has any.

    Raises ResourceError for a fractional GPU count above 1 (Ray only splits a single GPU).
    """
    gpus = float(res.gpus_per_worker)
    if gpus > 1 and not float(gpus).is_integer():
        raise ResourceError(
            f"resources.gpus_per_worker={gpus:g}: above 1 a worker needs a whole number of GPUs "
            "(Ray shares a GPU only in fractions below 1); fix: use 1, 2, ... or a value below 1")
    bundle: Bundle = {"CPU": float(res.cpus_per_worker)}
    if gpus > 0:
        bundle["GPU"] = gpus
    return bundle


def worker_bundles(res: ResourcesConfig) -> list[Bundle]:
    """The placement-group bundles of a run's trainer workers: one per worker."""
    return [worker_resources(res) for _ in range(res.num_workers)]


def defense_worker_resources(res: ResourcesConfig, use_gpu: bool) -> Bundle:
    """One Ray Train worker of the post-hoc defense: ``cpus_per_worker`` CPUs, and a whole GPU
    when ``defense.use_gpu`` (Ray Train's default with ``use_gpu``)."""
    return {"CPU": float(res.cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}


def driver_options(cpus: float = 1.0) -> dict[str, Any]:
    """``.options()`` of the driver actor: CPU only, never a GPU."""
    return {"num_cpus": float(cpus), "num_gpus": 0}


def gpu_sharing_message(res: ResourcesConfig) -> str | None:
    """The warning for fractional GPUs per worker, or None when each worker has whole GPUs."""
    gpus = float(res.gpus_per_worker)
    if not 0 < gpus < 1:
        return None
    per_gpu = math.floor(1 / gpus + _EPS)
    return (f"resources.gpus_per_worker={gpus:g}: up to {per_gpu} trainer workers share one GPU. "
            f"{GPU_SHARING_WARNING}: each worker loads its own copy of the base model, and their "
            "weights, activations and optimizer states must fit in that GPU together (a 7B model "
            "in bf16 alone is ~13.5 GB). Use whole GPUs for 7B models; share only small ones.")


def warn_if_gpu_shared(res: ResourcesConfig) -> str | None:
    """Emit :class:`GpuSharingWarning` (and a log line) when workers get a fraction of a GPU."""
    message = gpu_sharing_message(res)
    if message:
        warnings.warn(message, GpuSharingWarning, stacklevel=2)
        log.warning(message)
    return message


# ------------------------------------------------------------------------------- what a cluster has
@dataclass(frozen=True)
class NodeCapacity:
    """Total resources of one node, or of ``count`` identical nodes an autoscaler may launch."""

    name: str
    resources: Mapping[str, float]
    count: int = 1  # -1: as many as needed (autoscaler group without a limit)

    def describe(self) -> str:
        times = "" if self.count == 1 else f" x {self.count if self.count > 0 else 'unbounded'}"
        return f"{self.name}{times}: {format_resources(self.resources)}"


def format_resources(resources: Mapping[str, float]) -> str:
    """``CPU 2, GPU 1, memory 3.0 GiB``: the keys a person reads, without ``node:`` markers."""
    parts = []
    for key in sorted(resources, key=lambda k: (k not in ("CPU", "GPU"), k)):
        if key.startswith(_HIDDEN_KEYS) or _GROUP_KEY.search(key):
            continue
        value = float(resources[key])
        if key in _BYTE_KEYS:
            parts.append(f"{key} {value / 2**30:.1f} GiB")
        else:
            parts.append(f"{key} {value:g}")
    return ", ".join(parts) or "nothing"


def nodes_from_ray(node_table: Iterable[Mapping[str, Any]]) -> list[NodeCapacity]:
    """Alive nodes of ``ray.nodes()`` as capacities (dead nodes never come back)."""
    nodes = []
    for entry in node_table:
        if not entry.get("Alive", entry.get("alive", False)):
            continue
        node_id = str(entry.get("NodeID", ""))[:8]
        address = entry.get("NodeManagerAddress", "?")
        nodes.append(NodeCapacity(f"node {address} ({node_id})",
                                  {k: float(v) for k, v in (entry.get("Resources") or {}).items()}))
    return nodes


def nodes_from_autoscaler(node_groups: Iterable[tuple[str, Mapping[str, float], int]]
                          ) -> list[NodeCapacity]:
    """Node groups an autoscaler may launch, as ``(name, resources, max_count)``; ``max_count`` -1
    means unbounded and 0 means the group can launch nothing."""
    return [NodeCapacity(f"autoscaler group {name}", dict(resources), int(count))
            for name, resources, count in node_groups if int(count) != 0 and resources]


def cluster_nodes(include_autoscaler: bool = True) -> list[NodeCapacity]:
    """What the connected cluster has: its alive nodes, plus the node groups its autoscaler may
    still launch (KubeRay or the cluster launcher publish them), so an autoscaling cluster that
    starts with no GPU node is not called infeasible."""
    import ray

    nodes = nodes_from_ray(ray.nodes())
    if include_autoscaler:
        nodes += nodes_from_autoscaler(_autoscaler_node_groups())
    return nodes


def _autoscaler_node_groups() -> list[tuple[str, dict[str, float], int]]:
    try:  # the autoscaler's published config lives in a private API: absent means no autoscaler
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - a best-effort hint, never a reason to fail a run
        log.debug("no autoscaler config: %s", e)
        return []
    if config is None:
        return []
    return [(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
            for g in config.node_group_configs]


# ------------------------------------------------------------------------------- feasibility
def _fits(bundle: Mapping[str, float], capacity: Mapping[str, float]) -> bool:
    return all(amount <= capacity.get(key, 0.0) + _EPS for key, amount in bundle.items()
               if amount > 0)


def sum_bundles(bundles: Sequence[Mapping[str, float]]) -> Bundle:
    """Resources of several bundles added up, per key."""
    total: Bundle = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            total[key] = total.get(key, 0.0) + float(amount)
    return total


def _expand(nodes: Sequence[NodeCapacity], needed: int) -> list[Mapping[str, float]]:
    """One capacity per node; autoscaler groups count for at most ``needed`` nodes each."""
    out: list[Mapping[str, float]] = []
    for node in nodes:
        count = needed if node.count < 0 else min(node.count, needed)
        out.extend([node.resources] * count)
    return out


def _strict_spread_ok(bundles: Sequence[Mapping[str, float]],
                      caps: Sequence[Mapping[str, float]]) -> bool:
    """A matching of bundles to distinct nodes (augmenting paths)."""
    owner: dict[int, int] = {}

    def place(b: int, seen: set[int]) -> bool:
        for n, cap in enumerate(caps):
            if n in seen or not _fits(bundles[b], cap):
                continue
            seen.add(n)
            if n not in owner or place(owner[n], seen):
                owner[n] = b
                return True
        return False

    return all(place(b, set()) for b in range(len(bundles)))


def _pack_ok(bundles: Sequence[Mapping[str, float]], caps: Sequence[Mapping[str, float]]) -> bool:
    """Whether the bundles fit into the nodes at all (multi-dimensional bin packing, exact DFS
    with a step budget; past it, answer True and leave the verdict to the placement group)."""
    keys = sorted({k for b in bundles for k, v in b.items() if v > 0})
    if not keys:
        return True
    items = sorted((tuple(float(b.get(k, 0.0)) for k in keys) for b in bundles), reverse=True)
    free = [[float(c.get(k, 0.0)) for k in keys] for c in caps]
    if all(item == items[0] for item in items):  # identical bundles: count per node, exact
        fit = sum(min((math.floor(f[i] / v + _EPS) for i, v in enumerate(items[0]) if v > 0),
                      default=len(items)) for f in free)
        return fit >= len(items)
    steps = 0

    def dfs(i: int) -> bool:
        nonlocal steps
        if i == len(items):
            return True
        steps += 1
        if steps > _SEARCH_BUDGET:
            return True
        tried: set[tuple[float, ...]] = set()
        for f in free:
            state = tuple(round(x, 6) for x in f)
            if state in tried or any(v > x + _EPS for v, x in zip(items[i], f, strict=True)):
                continue
            tried.add(state)
            for j, v in enumerate(items[i]):
                f[j] -= v
            if dfs(i + 1):
                return True
            for j, v in enumerate(items[i]):
                f[j] += v
        return False

    return dfs(0)


def infeasibility(bundles: Sequence[Mapping[str, float]], strategy: str,
                  nodes: Sequence[NodeCapacity]) -> str | None:
    """Why these bundles can never be placed with this strategy on these nodes (None: they can)."""
    strategy = strategy.upper()
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if not bundles:
        return None
    caps = _expand(nodes, len(bundles))
    for bundle in bundles:
        if not any(_fits(bundle, cap) for cap in caps):
            largest = {k: max((c.get(k, 0.0) for c in caps), default=0.0) for k in bundle}
            return (f"no node can hold one bundle {{{format_resources(bundle)}}} (the most any "
                    f"node has: {format_resources(largest)})")
    if strategy == "STRICT_PACK":
        total = sum_bundles(bundles)
        if not any(_fits(total, cap) for cap in caps):
            return (f"STRICT_PACK needs all bundles on one node ({format_resources(total)}), "
                    "and no node has that much")
    elif strategy == "STRICT_SPREAD":
        if not _strict_spread_ok(bundles, caps):
            fitting = sum(any(_fits(b, cap) for b in bundles) for cap in caps)
            return (f"STRICT_SPREAD needs {len(bundles)} distinct nodes, one bundle each, and only "
                    f"{fitting} node(s) can hold a bundle")
    elif not _pack_ok(bundles, caps):
        total = sum_bundles(bundles)
        return (f"the bundles need {format_resources(total)} in all and do not fit into the nodes "
                "together")
    return None


def describe_request(bundles: Sequence[Mapping[str, float]], strategy: str) -> str:
    """``3 bundles of {CPU 1, GPU 1} with strategy SPREAD`` (grouping identical bundles)."""
    groups: dict[str, int] = {}
    for bundle in bundles:
        text = "{" + format_resources(bundle) + "}"
        groups[text] = groups.get(text, 0) + 1
    parts = [f"{n} x {text}" for text, n in groups.items()]
    return f"{len(bundles)} bundle(s): {' + '.join(parts)} with strategy {strategy.upper()}"


def describe_cluster(nodes: Sequence[NodeCapacity]) -> str:
    alive = [n for n in nodes if not n.name.startswith("autoscaler group")]
    lines = [f"the cluster has {len(alive)} alive node(s):"]
    lines += [f"  - {n.describe()}" for n in nodes]
    total = sum_bundles([n.resources for n in alive])
    lines.append(f"  alive total: {format_resources(total)}")
    return "\n".join(lines)


def check_feasible(bundles: Sequence[Mapping[str, float]], strategy: str,
                   nodes: Sequence[NodeCapacity] | None = None, *,
                   what: str = "trainer workers") -> None:
    """Raise :class:`ResourceError` when ``bundles`` can never be placed with ``strategy``.

    ``nodes`` defaults to :func:`cluster_nodes` of the connected cluster (alive nodes plus what its
    autoscaler may launch). The check uses node totals, not free resources: busy resources free up,
    missing ones never appear. The message names the request, the reason, every node and a fix.
    """
    if nodes is None:
        nodes = cluster_nodes()
    reason = infeasibility(bundles, strategy, nodes)
    if reason is None:
        return
    raise ResourceError(
        f"cannot ever schedule the {what}: asked for {describe_request(bundles, strategy)}; "
        f"{reason}.\n{describe_cluster(nodes)}\n"
        "fix: lower resources.num_workers, resources.gpus_per_worker or resources.cpus_per_worker, "
        "choose another resources.placement_strategy (PACK and SPREAD are soft), or add nodes with "
        "the missing resources")


# ------------------------------------------------------------------------------- reserving
@dataclass
class WorkerPlacement:
    """Reserved bundles of the trainer workers; :meth:`worker_options` puts worker ``i`` in one."""

    placement_group: PlacementGroup
    bundle_indices: list[int]
    resources: Bundle
    max_restarts: int = 0
    owned: bool = True
    _released: bool = field(default=False, repr=False)

    @property
    def num_workers(self) -> int:
        return len(self.bundle_indices)

    def worker_options(self, index: int) -> dict[str, Any]:
        """``.options(**...)`` of trainer worker ``index``: its resources, its bundle, restarts."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not 0 <= index < self.num_workers:
            raise IndexError(f"worker {index} of {self.num_workers}")
        return {
            "num_cpus": self.resources.get("CPU", 0.0),
            "num_gpus": self.resources.get("GPU", 0.0),
            "max_restarts": self.max_restarts,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group,
                placement_group_bundle_index=self.bundle_indices[index],
            ),
        }

    def release(self) -> None:
        """Give the bundles back (only a placement group this object created; idempotent)."""
        if self.owned and not self._released:
            from ray.util import remove_placement_group

            remove_placement_group(self.placement_group)
        self._released = True

    def __enter__(self) -> WorkerPlacement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _reuse_current(res: ResourcesConfig) -> WorkerPlacement | None:
    from ray.util import get_current_placement_group

    current = get_current_placement_group()
    if current is None:
        return None
    wanted = worker_bundles(res)
    specs = list(current.bundle_specs)
    indices = list(range(len(wanted)))
    have = specs[:len(wanted)]
    if len(have) < len(wanted) or not all(_fits(w, h) for w, h in zip(wanted, have, strict=False)):
        raise ResourceError(
            f"this run executes inside a placement group (a Ray Tune trial?) whose bundles "
            f"{[format_resources(s) for s in specs]} do not hold the trainer workers' "
            f"{describe_request(wanted, res.placement_strategy)} in its first bundles; "
            "fix: reserve ray_fedit.sweeps.trial_bundles(config) for each trial")
    return WorkerPlacement(current, indices, worker_resources(res), res.max_restarts, owned=False)


def acquire_worker_placement(res: ResourcesConfig, *, name: str = "",
                             timeout_s: float | None = DEFAULT_PLACEMENT_TIMEOUT_S,
                             nodes: Sequence[NodeCapacity] | None = None,
                             reuse_current: bool = True) -> WorkerPlacement:
    """Reserve the trainer workers' bundles as one placement group (gang scheduling).

    1. warn when workers share GPUs (:data:`GPU_SHARING_WARNING`);
    2. inside a placement group that captures child tasks (a Ray Tune trial that reserved
       :func:`ray_fedit.sweeps.trial_bundles`), use its bundles ``0..n-1`` and create nothing;
    3. otherwise :func:`check_feasible` against the cluster (fails at once when it never fits),
       create the placement group with ``res.placement_strategy`` and wait up to ``timeout_s``
       (None: forever) for it; on timeout remove it and raise :class:`ResourceError` with what the
       cluster has free now.
    """
    import ray
    from ray.util import placement_group, remove_placement_group

    warn_if_gpu_shared(res)
    if reuse_current:
        reused = _reuse_current(res)
        if reused is not None:
            return reused
    bundles = worker_bundles(res)
    strategy = res.placement_strategy
    check_feasible(bundles, strategy, nodes)
    pg = placement_group(bundles, strategy=strategy, name=name)
    start = time.monotonic()
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        free = format_resources(ray.available_resources())
        remove_placement_group(pg)
        raise ResourceError(
            f"the trainer workers' placement group was not ready after "
            f"{time.monotonic() - start:.1f} s: asked for {describe_request(bundles, strategy)}; "
            f"the cluster could hold it but has only {free} free now (other runs or trials hold "
            "the rest). fix: wait for them, raise the timeout, or lower resources.num_workers")
    log.info("reserved %s", describe_request(bundles, strategy))
    return WorkerPlacement(pg, list(range(len(bundles))), worker_resources(res), res.max_restarts)


def placement_nodes(placement: WorkerPlacement) -> list[str]:
    """Node id hosting each worker's bundle (for logs and tests)."""
    from ray.util import placement_group_table

    table = placement_group_table(placement.placement_group)
    by_bundle = table.get("bundles_to_node_id", {})
    return [str(by_bundle.get(i, "")) for i in placement.bundle_indices]

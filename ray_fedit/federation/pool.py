"""The pool of trainer workers: placement, dispatch with affinity, retries and round timeouts.

The pool is the only place that submits client tasks. Failure handling follows
``federation.on_client_failure``:

- ``retry``: a failed task (its worker died, or it raised) is re-run on the next worker, up to
  ``federation.max_task_retries`` times; a client that still fails stops the run (ClientFailure).
  When the worker died, the retry first waits (with backoff, up to
  ``federation.worker_recovery_s``) until its target worker answers again: a restarting worker is
  waited for, and one whose ``resources.max_restarts`` are used up is replaced by a fresh worker in
  the same placement bundle. So a task survives the loss of the only worker, and the restart does
  not use up the retries.
- ``drop``: the client is left out of the round (the driver then checks ``min_quorum``).
- ``raise``: the first failure stops the run.

A task still running at ``round_timeout_s`` counts as failed; it is dropped under ``drop`` and stops
the run otherwise (retrying past the round's deadline cannot help). Ray itself does not retry
tasks (``max_task_retries=0`` on the actors): Ray would re-run a task only on the same, restarting
worker, and would hide the failure from the policy. Workers do restart (``resources.max_restarts``),
so the pool heals for later rounds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayError

from ray_fedit.config import RunConfig
from ray_fedit.errors import ClientFailure, ConfigError
from ray_fedit.federation.sampling import assign_workers
from ray_fedit.federation.state import ClientTask, ClientUpdate
from ray_fedit.federation.worker import TrainerWorker
from ray_fedit.models.codec import AdapterCodec
from ray_fedit.resources import acquire_worker_placement

log = logging.getLogger("ray_fedit.federation")


@dataclass(frozen=True)
class TaskFailure:
    """A client task that did not produce an update."""

    client_id: int
    attempts: int
    kind: str  # "worker_died" | "error" | "timeout"
    error: str


@dataclass
class RoundOutcome:
    """What the workers produced in one round."""

    updates: dict[int, ClientUpdate] = field(default_factory=dict)
    failures: dict[int, TaskFailure] = field(default_factory=dict)
    retries: int = 0
    assignment: dict[int, int] = field(default_factory=dict)


def worker_settings(cfg: RunConfig) -> dict[str, Any]:
    """The config sections a trainer worker reads (``TrainerWorker`` never reads the attack or the
    aggregator): federations with equal settings can share one pool, e.g. a run's attacked
    federation and its paired no-attack one (:func:`ray_fedit.pipeline.no_attack_config`)."""
    return cfg.model_dump(include={"seed", "model", "lora", "data", "federation", "resources"})


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:500]


class WorkerPool:
    """``resources.num_workers`` trainer actors, each holding the base model once.

    Placement comes from :func:`ray_fedit.resources.acquire_worker_placement`: one bundle per
    worker with ``resources.placement_strategy``, or the bundles of the enclosing Ray Tune trial.
    The constructor starts the workers without waiting for them; :meth:`wait_ready` waits.

    A pool can serve several federations one after the other (``run_federation(..., pool=pool)``)
    when their :func:`worker_settings` are equal: the model loads once. Used as a context manager,
    it shuts down on exit.

    Args:
        cfg: the run's config.
        placement_name: a name for the placement group it creates, so that another process can
            find and remove it (a placement group outlives the actor that created it).

    Raises:
        ResourceError: if the cluster cannot place the workers.
    """

    def __init__(self, cfg: RunConfig, *, placement_name: str = "") -> None:
        self.cfg = cfg
        self.size = cfg.resources.num_workers
        self.placement = acquire_worker_placement(cfg.resources, name=placement_name)
        self.workers = [self._start(i) for i in range(self.size)]
        self._describe = [w.describe.remote() for w in self.workers]
        self.pids: list[int] = []
        self.inflight: dict[int, int] = {}  # client -> worker of the tasks not yet collected

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def serves(self, cfg: RunConfig) -> bool:
        """Whether these workers compute what workers started from ``cfg`` would."""
        return worker_settings(cfg) == worker_settings(self.cfg)

    def refresh(self) -> None:
        """Ready a pool that served an earlier federation for the next one.

        A worker that died there is waited for or replaced (:meth:`await_worker`), and every
        worker forgets its cached tokenized shards: the next federation's client ids may hold
        other shards (the no-attack run's malicious slots hold benign ones), so the workers fetch
        and tokenize them as fresh workers would.
        """
        for index in range(self.size):
            self.await_worker(index)
        ray.get([w.clear_shards.remote() for w in self.workers])

    def _start(self, index: int) -> Any:
        # Ray retries nothing itself (see the module docstring); restarts come with the options.
        return TrainerWorker.options(**self.placement.worker_options(index),
                                     max_task_retries=0).remote(self.cfg, index)

    def await_worker(self, index: int) -> None:
        """Block until worker ``index`` answers: wait out a restart, replace a worker gone for good.

        Raises:
            ClientFailure: if it does not answer within ``federation.worker_recovery_s``.
        """
        limit = self.cfg.federation.worker_recovery_s
        deadline, delay = time.monotonic() + limit, 0.05
        while True:
            try:
                left = max(0.1, deadline - time.monotonic())
                self.pids[index] = int(ray.get(self.workers[index].ping.remote(), timeout=left))
                return
            except (ActorUnavailableError, GetTimeoutError):
                pass  # restarting: the model is loading again
            except ActorDiedError:
                log.warning("trainer worker %d is gone (resources.max_restarts=%d used up); "
                            "starting a replacement in its placement bundle", index,
                            self.cfg.resources.max_restarts)
                ray.kill(self.workers[index], no_restart=True)
                self.workers[index] = self._start(index)
            if time.monotonic() >= deadline:
                raise ClientFailure(f"trainer worker {index} did not answer within "
                                    f"federation.worker_recovery_s={limit:g} s after it died; "
                                    "see the worker's log, or raise the limit")
            time.sleep(delay)
            delay = min(2 * delay, 2.0)

    def wait_ready(self) -> None:
        """Wait for every worker to load the model; check they built the same adapter.

        Raises:
            ConfigError: if the workers disagree on the adapter layout or the initial adapter.
        """
        infos = ray.get(self._describe)
        self.codec = AdapterCodec.from_json(infos[0]["codec"])
        self.initial = np.array(infos[0]["initial"], dtype=np.float32)
        for info in infos[1:]:
            if (AdapterCodec.from_json(info["codec"]) != self.codec
                    or not np.array_equal(info["initial"], self.initial)):
                raise ConfigError("trainer workers built different adapters from the same config; "
                                  "check that every node has the same model files and packages")
        self.adapter_config: str = infos[0]["adapter_config"]
        self.pids = [int(info["pid"]) for info in infos]
        self.devices = [str(info["device"]) for info in infos]

    def run_round(
        self,
        tasks: list[ClientTask],
        global_ref: ray.ObjectRef,
        extra_args: dict[int, tuple[Any, ...]],
        *,
        policy: str,
        max_retries: int,
        deadline: float | None,
    ) -> RoundOutcome:
        """Run the round's client tasks and collect their updates.

        Args:
            tasks: one task per sampled client.
            global_ref: the round's global adapter in the object store (put once by the driver).
            extra_args: per client, the remaining ``train_client`` arguments (shard box, state,
                control).
            policy: ``federation.on_client_failure``.
            max_retries: retries per client under ``retry``.
            deadline: ``time.monotonic()`` by which the round's tasks must finish, or None.

        Returns:
            Updates and failures by client id, the retry count and the client -> worker map.

        Raises:
            ClientFailure: when the policy says a failure stops the run.
        """
        out = RoundOutcome(assignment=assign_workers([t.client_id for t in tasks], self.size))
        pending: dict[ray.ObjectRef, tuple[ClientTask, int]] = {}

        def submit(task: ClientTask, worker: int) -> None:
            ref = self.workers[worker].train_client.remote(task, global_ref,
                                                           *extra_args[task.client_id])
            pending[ref] = (task, worker)
            self.inflight[task.client_id] = worker

        for task in tasks:
            submit(task, out.assignment[task.client_id])
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:
                self._time_out(pending, out, policy)
                break
            ref = ready[0]
            task, worker = pending.pop(ref)
            self.inflight.pop(task.client_id, None)
            try:
                out.updates[task.client_id] = ray.get(ref)
            except RayError as e:
                kind = "worker_died" if isinstance(e, RayActorError) else "error"
                where = (f"round {task.round_index + 1}: client {task.client_id} failed on worker "
                         f"{worker} (attempt {task.attempt + 1}): {_short(e)}")
                if policy == "retry" and task.attempt < max_retries:
                    target = (worker + 1) % self.size
                    log.warning("%s; retrying on worker %d", where, target)
                    if kind == "worker_died":
                        self.await_worker(target)
                    out.retries += 1
                    submit(replace(task, attempt=task.attempt + 1), target)
                    continue
                if policy != "drop":
                    raise ClientFailure(
                        f"{where}; federation.on_client_failure={policy}"
                        + (f" and max_task_retries={max_retries} are used up" if policy == "retry"
                           else "") + "; use on_client_failure=drop with a min_quorum to go on "
                        "without it") from e
                log.warning("%s; dropped (on_client_failure=drop)", where)
                out.failures[task.client_id] = TaskFailure(task.client_id, task.attempt + 1, kind,
                                                           _short(e))
        return out

    def _time_out(self, pending: dict[ray.ObjectRef, tuple[ClientTask, int]], out: RoundOutcome,
                  policy: str) -> None:
        late = sorted(task.client_id for task, _ in pending.values())
        for ref in pending:
            try:
                ray.cancel(ref)  # removes queued tasks; a running one finishes and is ignored
            except (RayError, TypeError, ValueError):
                pass
        if policy != "drop":
            raise ClientFailure(f"clients {late} did not finish within federation.round_timeout_s;"
                                " raise the timeout, or use on_client_failure=drop with a "
                                "min_quorum to go on without them")
        for task, _ in pending.values():
            log.warning("round %d: client %d timed out; dropped", task.round_index + 1,
                        task.client_id)
            out.failures[task.client_id] = TaskFailure(task.client_id, task.attempt + 1, "timeout",
                                                       "round_timeout_s exceeded")
        pending.clear()
        self.inflight.clear()

    def shutdown(self) -> None:
        """Stop the workers and release their placement group."""
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.placement.release()

"""The federation driver: a Ray actor whose ``run()`` is the FedIT round recipe.

One round (``FederationDriver._round``), top to bottom::

    sample clients -> put the global adapter in the object store once -> dispatch client tasks to
    the trainer workers -> collect their updates -> validate -> update-space attack (malicious rows)
    -> aggregate (registered rule, with its state) -> server optimizer step -> evaluate (every
    eval_every rounds) -> checkpoint -> log

The maths lives in Ray-free modules (``sampling``, ``sft``, ``server_opt``, ``updates``,
``rule_state``, ``checkpoint``); the dispatch, retries and timeouts in ``pool``. Where the rule runs
(in this actor, on coordinate shards as Ray tasks, or on a GPU: ``aggregator.num_shards`` and
``aggregator.device``) is ``sharded.run_rule``'s business.
:func:`run_federation` is the entry point the pipeline and the CLI call.

Outputs in the run directory: ``rounds.jsonl`` (one JSON line per round),
``checkpoints/round_XXXX/`` (every ``checkpoint_every`` rounds), ``checkpoints/final/`` (the final
global adapter, PEFT format), ``checkpoints/eval/round_XXXX/`` (adapters handed to the evaluation
hook) and ``client_state/`` (SCAFFOLD control variates).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from ray_fedit.aggregators import AGGREGATORS, AggregationResult
from ray_fedit.config import RunConfig
from ray_fedit.errors import CheckpointError, ClientFailure, ConfigError
from ray_fedit.federation import checkpoint as ckpt
from ray_fedit.federation import rule_state, sharded
from ray_fedit.federation.pool import WorkerPool
from ray_fedit.federation.sampling import NO_CLIENT, derive_seed, sample_clients
from ray_fedit.federation.server_opt import ServerOptConfig, init_state, server_step
from ray_fedit.federation.sft import cosine_learning_rate
from ray_fedit.federation.state import ClientSpec, ClientTask, FederationResult, FederationState
from ray_fedit.federation.updates import (
    aggregation_weights,
    client_metrics,
    jsonable,
    scaffold_control,
    validate_update,
)
from ray_fedit.resources import driver_options
from ray_fedit.rundir import RunDir, config_hash

log = logging.getLogger("ray_fedit.federation")

DRIVER_CPUS = 0.0

EvalHook = Callable[[int, Path], Mapping[str, Any] | None]


def _progress_logger() -> None:
    """Make the one-line-per-round progress visible in the driver actor's stderr (Ray's logs)."""
    from ray_fedit.console import show_project_logs

    show_project_logs("%(asctime)s %(levelname)s %(name)s: %(message)s", None)


def server_opt_config(cfg: RunConfig) -> ServerOptConfig:
    fed = cfg.federation
    return ServerOptConfig(name=fed.server_optimizer, lr=fed.resolved_server_lr,
                           momentum=fed.server_momentum, beta1=fed.server_beta1,
                           beta2=fed.server_beta2, tau=fed.server_tau)


def sampling_mode(cfg: RunConfig) -> str:
    return "openfedllm" if cfg.federation.compat == "openfedllm" else cfg.federation.sampling


# "control" serves status() while run() is busy. Resources are set in start_federation.
@ray.remote(concurrency_groups={"control": 1})
class FederationDriver:
    """Runs the rounds of one federation on a pool of trainer workers.

    Args:
        cfg: the run's config.
        run_root: the run directory.
        clients: every registered client (ids ``0..num_clients-1``), shards in the object store.
        eval_hook: ``hook(rounds_done, adapter_dir) -> metrics`` called every
            ``federation.eval_every`` rounds inside this actor, or None.
        resume: continue from the latest checkpoint in the run directory.
        stop_after: stop (with a checkpoint) once this many rounds are done; resume to continue.
        sampling_strata: the ids stratified sampling treats as malicious (default: the malicious
            clients); the paired no-attack federation passes the attacked run's.
        pool: trainer workers started by the caller and kept after the run (None: start a pool
            for this run and shut it down after).
    """

    def __init__(self, cfg: RunConfig, run_root: str, clients: list[ClientSpec],
                 eval_hook: EvalHook | None, resume: bool, stop_after: int | None,
                 sampling_strata: list[int] | None = None,
                 pool: WorkerPool | None = None) -> None:
        _progress_logger()
        # Aggregation and server maths on one thread: same bits on every machine.
        torch.set_num_threads(1)
        self.cfg = cfg
        self.run_dir = RunDir(Path(run_root))
        self.clients = {c.client_id: c for c in clients}
        self.malicious_ids = sorted(c.client_id for c in clients if c.is_malicious)
        self.sampling_strata = (self.malicious_ids if sampling_strata is None
                                else sorted(sampling_strata))
        self._warned: set[str] = set()
        self._plain_mean: str | None = None
        self.eval_hook = eval_hook
        self.resume = resume
        self.stop_after = stop_after
        self.config_hash = config_hash(cfg)
        self.opt = server_opt_config(cfg)
        self.store = ckpt.ClientStateStore(self.run_dir.root / "client_state")
        self.pool: WorkerPool | None = None
        self._given_pool = pool
        self._checkpointed_index: dict[int, dict[str, Any]] = {}
        self._status: dict[str, Any] = {"phase": "created", "round": 0}

    @ray.method(concurrency_group="control")
    def status(self) -> dict[str, Any]:
        """Where the run is, for monitoring.

        Returns:
            ``phase``, 1-based ``round``, ``inflight`` (client -> worker of uncollected tasks),
            ``pid`` (the driver's) and ``worker_pids``.
        """
        pool = self.pool
        return {**self._status, "pid": os.getpid(),
                "worker_pids": list(pool.pids) if pool else [],
                "inflight": dict(pool.inflight) if pool else {}}

    # ------------------------------------------------------------------------------------- run
    def run(self) -> FederationResult:
        """Run the remaining rounds; write the final adapter; return the result."""
        t_start = time.perf_counter()
        fed = self.cfg.federation
        self._status["phase"] = "starting workers"
        owned = self._given_pool is None
        self.pool = (WorkerPool(self.cfg, placement_name=pool_placement_name(self.run_dir.root))
                     if owned else self._given_pool)
        try:
            self.pool.wait_ready()
            if not owned:
                self.pool.refresh()
            self.codec = self.pool.codec
            self.state, resumed_from = self._initial_state()
            self._warn_if_plain_mean()
            for rnd in range(self.state.rounds_done, fed.rounds):
                self._round(rnd)
                if self.stop_after is not None and self.state.rounds_done >= self.stop_after:
                    break
            finished = self.state.rounds_done == fed.rounds
            adapter_dir = self._save_final() if finished else None
            self._status["phase"] = "done"
            return FederationResult(
                run_dir=self.run_dir.root, adapter_dir=adapter_dir,
                global_vector=self.state.global_vector.copy(), codec=self.codec,
                rounds=list(self.state.metrics), rounds_completed=self.state.rounds_done,
                finished=finished, resumed_from=resumed_from, malicious_ids=self.malicious_ids,
                seconds=time.perf_counter() - t_start, worker_pids=list(self.pool.pids))
        finally:
            if owned:
                self.pool.shutdown()

    def _round(self, rnd: int) -> None:
        """One FedIT round: the recipe, top to bottom."""
        t0 = time.perf_counter()
        fed = self.cfg.federation
        self._status.update(phase="training", round=rnd + 1)
        # --- sample clients; this round's learning rate -----------------------------------------
        sampled = sample_clients(seed=self.cfg.seed, round_index=rnd, num_clients=fed.num_clients,
                                 clients_per_round=fed.clients_per_round,
                                 mode=sampling_mode(self.cfg), malicious_ids=self.sampling_strata)
        lr = cosine_learning_rate(rnd, fed.rounds, fed.lr, fed.lr_min)
        # --- the global adapter goes to the object store once; tasks go to the workers ----------
        global_ref = ray.put(self.state.global_vector)
        old_states = self._client_states(sampled)
        deadline = None if fed.round_timeout_s is None else time.monotonic() + fed.round_timeout_s
        outcome = self.pool.run_round(
            [ClientTask(c, rnd, lr) for c in sampled], global_ref,
            self._task_args(sampled, old_states), policy=fed.on_client_failure,
            max_retries=fed.max_task_retries, deadline=deadline)
        del global_ref
        # --- validate, in client-id order (never completion order) ------------------------------
        self._status["phase"] = "aggregating"
        accepted, rejected = self._validate(rnd, sampled, outcome.updates)
        self._check_quorum(rnd, sampled, accepted, rejected, outcome.failures)
        ids = sorted(accepted)
        deltas = torch.from_numpy(np.stack([accepted[c].delta for c in ids]))
        # --- update-space attack on the malicious rows ------------------------------------------
        deltas, attack_note = self._attack(rnd, ids, deltas)
        # --- aggregate with the configured rule and its state (center, history, generator) ------
        weights = torch.from_numpy(aggregation_weights([accepted[c] for c in ids],
                                                       sampling_mode(self.cfg)))
        agg = self._aggregate(rnd, ids, deltas, weights)
        # --- server optimizer step (and SCAFFOLD's control update) ------------------------------
        self._server_step(rnd, ids, accepted, old_states, agg)
        # --- evaluate every eval_every rounds ---------------------------------------------------
        evaluation = self._evaluate(rnd + 1)
        # --- checkpoint, then log ---------------------------------------------------------------
        record = self._record(rnd, lr, sampled, ids, accepted, rejected, outcome, deltas, weights,
                              agg, attack_note, evaluation, time.perf_counter() - t0)
        self.state.metrics.append(record)
        self._maybe_checkpoint()
        self._log(record)

    # ------------------------------------------------------------------------------ the steps
    def _initial_state(self) -> tuple[FederationState, int | None]:
        root = self.run_dir.checkpoints
        ckpt.remove_temp_dirs(root)
        latest = ckpt.find_latest(root) if self.resume else None
        if latest is None:
            state = FederationState(rounds_done=0, global_vector=self.pool.initial.copy(),
                                    server=init_state(self.opt, self.codec.dim),
                                    control=self._zeros() if self._scaffold else None)
            if self.resume:
                log.info("resume: no checkpoint in %s, starting at round 1", root)
            resumed_from = None
        else:
            body = ckpt.read_checkpoint(latest, config_hash=self.config_hash)
            state = ckpt.load_checkpoint(latest, body, self.codec)
            resumed_from = state.rounds_done
            log.info("resume: %s, continuing at round %d", latest, state.rounds_done + 1)
        self._checkpointed_index = dict(state.client_state)
        self.store.prune(state.client_state)  # drop state written after the checkpoint
        lines = "".join(json.dumps(m) + "\n" for m in state.metrics)
        tmp = self.run_dir.rounds.with_name(f".{self.run_dir.rounds.name}.tmp{os.getpid()}")
        tmp.write_text(lines)
        tmp.replace(self.run_dir.rounds)
        return state, resumed_from

    @property
    def _scaffold(self) -> bool:
        return self.cfg.federation.algorithm == "scaffold"

    def _zeros(self) -> np.ndarray:
        return np.zeros(self.codec.dim, dtype=np.float32)

    def _client_states(self, sampled: Sequence[int]) -> dict[int, np.ndarray]:
        """SCAFFOLD's c_i of the sampled clients (from disk, the ClientSpec, or zeros)."""
        if not self._scaffold:
            return {}
        out = {}
        for c in sampled:
            if c in self.state.client_state:
                out[c] = self.store.load(c, self.state.client_state[c])
            elif self.clients[c].state is not None:
                initial = self.clients[c].state
                out[c] = np.asarray(ray.get(initial) if isinstance(initial, ray.ObjectRef)
                                    else initial, dtype=np.float32)
            else:
                out[c] = self._zeros()
        return out

    def _task_args(self, sampled: Sequence[int],
                   states: Mapping[int, np.ndarray]) -> dict[int, tuple[Any, ...]]:
        if not self._scaffold:
            return {c: ([self.clients[c].shard],) for c in sampled}
        control_ref = ray.put(self.state.control)
        return {c: ([self.clients[c].shard], ray.put(states[c]), control_ref) for c in sampled}

    def _validate(self, rnd: int, sampled: Sequence[int], updates: Mapping[int, Any]
                  ) -> tuple[dict[int, Any], dict[int, str]]:
        fed = self.cfg.federation
        accepted, rejected = {}, {}
        for c in sorted(updates):
            reason = validate_update(c, updates[c], dim=self.codec.dim, sampled=sampled,
                                     num_clients=fed.num_clients, needs_state=self._scaffold)
            if reason is None:
                accepted[c] = updates[c]
            else:
                rejected[c] = reason
                log.warning("round %d: rejected the update of client %d: %s", rnd + 1, c, reason)
        return accepted, rejected

    def _check_quorum(self, rnd: int, sampled: Sequence[int], accepted: Mapping[int, Any],
                      rejected: Mapping[int, str], failures: Mapping[int, Any]) -> None:
        fed = self.cfg.federation
        quorum = fed.min_quorum or fed.clients_per_round
        if len(accepted) < max(1, quorum):
            raise ClientFailure(
                f"round {rnd + 1}: {len(accepted)} of {len(sampled)} sampled clients gave a usable "
                f"update (rejected: {dict(rejected)}, failed: {sorted(failures)}), below "
                f"federation.min_quorum={quorum}; lower min_quorum or fix the failing clients")

    def _attack(self, rnd: int, ids: Sequence[int], deltas: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        attack = self.cfg.attack.update
        if attack.name == "none":
            return deltas, None
        from ray_fedit.attacks import InsufficientReference, apply_update_attack

        mask = torch.tensor([self.clients[c].is_malicious for c in ids], dtype=torch.bool)
        generator = torch.Generator().manual_seed(
            derive_seed(self.cfg.seed, rnd, NO_CLIENT, "update_attack"))
        try:
            out = apply_update_attack(attack.name, deltas, mask, generator, **attack.params)
        except InsufficientReference as e:
            if attack.on_too_few_references == "raise":
                raise ConfigError(f"round {rnd + 1}: {e} (attack.update.on_too_few_references="
                                  "raise)") from None
            # The attackers send the update they trained on their poisoned data, unchanged.
            self._warn_once(f"attack:{attack.name}", "round %d: %s; the malicious clients send "
                            "their trained updates unchanged in such rounds (logged in "
                            "rounds.jsonl as update_attack.applied=false)", rnd + 1, e)
            return deltas, {"name": attack.name, "applied": False, "reason": str(e)}
        return out, {"name": attack.name, "applied": bool(mask.any())}

    def _aggregate(self, rnd: int, ids: Sequence[int], deltas: torch.Tensor,
                   weights: torch.Tensor) -> AggregationResult:
        name = self.cfg.aggregator.name
        state = rule_state.round_state(name, self.state.rule, client_ids=ids, dim=self.codec.dim,
                                       seed=self.cfg.seed, round_index=rnd)
        # One shard on the CPU (the default) is ``aggregate`` in this process; otherwise the
        # rule's coordinate-wise step runs in Ray shard tasks or on this process's GPU.
        agg = sharded.run_rule(self.cfg.aggregator, name, deltas, weights, state=state,
                               **self.cfg.aggregator_params())
        rule_state.advance(name, self.state.rule, client_ids=ids, updates=deltas,
                           aggregate=agg.aggregate)
        if self._plain_mean is not None:
            agg.info.setdefault("fallback", self._plain_mean)
        fallback = agg.info.get("fallback")
        if fallback:
            self._warn_once(f"fallback:{fallback}", "round %d: %s (recorded as "
                            "aggregator_info.fallback in rounds.jsonl; said once per run)",
                            rnd + 1, fallback)
        return agg

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _warn_if_plain_mean(self) -> None:
        """Say it once, and in every round's record, when the settings make the rule the mean."""
        name, params = self.cfg.aggregator.name, self.cfg.aggregator_params()
        same = AGGREGATORS.meta(name).get("reduces_to_mean") or {}
        self._plain_mean = None
        if same and all(params.get(k) == v for k, v in same.items()):
            self._plain_mean = f"{name} with {same} is the weighted mean (FedAvg) in every round"

    def _server_step(self, rnd: int, ids: Sequence[int], accepted: Mapping[int, Any],
                     old_states: Mapping[int, np.ndarray], agg: AggregationResult) -> None:
        state = self.state
        state.global_vector, state.server = server_step(self.opt, state.server,
                                                        state.global_vector,
                                                        agg.aggregate.numpy())
        if self._scaffold:
            state.control = scaffold_control(
                state.control, [accepted[c].state - old_states[c] for c in ids],
                agg.client_weights.numpy(), sampled_share=len(ids) / self.cfg.federation.num_clients)
            for c in ids:
                state.client_state[c] = self.store.save(c, rnd, accepted[c].state)
        state.rounds_done = rnd + 1

    def _evaluate(self, rounds_done: int) -> dict[str, Any] | None:
        every = self.cfg.federation.eval_every
        if self.eval_hook is None or not every or rounds_done % every:
            return None
        self._status["phase"] = "evaluating"
        adapter_dir = ckpt.write_adapter(
            self.run_dir.checkpoints / "eval" / f"round_{rounds_done:04d}",
            self.state.global_vector, codec=self.codec, adapter_config=self.pool.adapter_config)
        return dict(self.eval_hook(rounds_done, adapter_dir) or {})

    def _maybe_checkpoint(self) -> None:
        fed, done = self.cfg.federation, self.state.rounds_done
        due = fed.checkpoint_every and done % fed.checkpoint_every == 0
        stopping = self.stop_after is not None and done >= self.stop_after and done < fed.rounds
        if due or stopping:
            self._status["phase"] = "checkpointing"
            ckpt.save_checkpoint(self.run_dir.checkpoints, self.state,
                                 config_hash=self.config_hash, codec=self.codec,
                                 adapter_config=self.pool.adapter_config, seed=self.cfg.seed)
            self._checkpointed_index = dict(self.state.client_state)
        self.store.prune(self.state.client_state, self._checkpointed_index)

    def _record(self, rnd: int, lr: float, sampled: Sequence[int], ids: Sequence[int],
                accepted: Mapping[int, Any], rejected: Mapping[int, str], outcome: Any,
                deltas: torch.Tensor, weights: torch.Tensor, agg: Any,
                attack_note: Mapping[str, Any] | None, evaluation: Mapping[str, Any] | None,
                seconds: float) -> dict[str, Any]:
        norms, cosines = client_metrics(deltas.numpy(), agg.aggregate.numpy())
        clients = []
        for i, c in enumerate(ids):
            st = accepted[c].stats
            clients.append({
                "id": c, "malicious": self.clients[c].is_malicious, "loss": st["loss"],
                "examples": accepted[c].n_examples, "tokens": st["tokens"],
                "norm": float(norms[i]), "cosine": float(cosines[i]),
                "weight": float(agg.client_weights[i]), "input_weight": float(weights[i]),
                "seconds": st["seconds"], "bytes": st["bytes"], "worker": st["worker"],
                "attempt": st["attempt"]})
        losses = [x["loss"] for x in clients if x["loss"] == x["loss"]]  # drop NaN
        return jsonable({
            "round": rnd + 1, "rounds": self.cfg.federation.rounds, "lr": lr,
            "sampled": list(sampled), "aggregated": list(ids),
            "rejected": [{"client": c, "reason": r} for c, r in sorted(rejected.items())],
            "failed": [{"client": f.client_id, "kind": f.kind, "attempts": f.attempts,
                        "error": f.error} for _, f in sorted(outcome.failures.items())],
            "retries": outcome.retries, "assignment": outcome.assignment,
            "mean_loss": float(np.mean(losses)) if losses else None,
            "aggregate_norm": float(np.linalg.norm(agg.aggregate.numpy().astype(np.float64))),
            "aggregator_info": agg.info, "update_attack": attack_note, "clients": clients,
            "eval": evaluation,
            "bytes": int(sum(x["bytes"] for x in clients)), "seconds": seconds,
        })

    def _log(self, record: Mapping[str, Any]) -> None:
        with self.run_dir.rounds.open("a") as f:
            f.write(json.dumps(record) + "\n")
        loss = record["mean_loss"]
        log.info("round %d/%d | clients %d (rejected %d, failed %d, retries %d) | loss %s | "
                 "%.2f s | %.3f MB moved", record["round"], record["rounds"],
                 len(record["aggregated"]), len(record["rejected"]), len(record["failed"]),
                 record["retries"], "n/a" if loss is None else f"{loss:.4f}", record["seconds"],
                 record["bytes"] / 2**20)

    def _save_final(self) -> Path:
        return ckpt.save_final(
            self.run_dir.checkpoints, self.state.global_vector, codec=self.codec,
            adapter_config=self.pool.adapter_config,
            summary={"rounds_done": self.state.rounds_done, "config_hash": self.config_hash,
                     "codec_fingerprint": self.codec.fingerprint(),
                     "malicious_ids": self.malicious_ids})


# ------------------------------------------------------------------------------- entry points
def check_clients(cfg: RunConfig, clients: Sequence[ClientSpec]) -> None:
    """The client list must match the config: ids exactly ``0..num_clients-1``.

    Raises:
        ConfigError: naming the mismatch.
    """
    fed = cfg.federation
    ids = sorted(c.client_id for c in clients)
    if ids != list(range(fed.num_clients)):
        raise ConfigError(f"got {len(clients)} clients with ids {ids[:5]}..., but "
                          f"federation.num_clients={fed.num_clients} needs ids "
                          f"0..{fed.num_clients - 1} exactly once each; build the clients from the "
                          "same config")
    if fed.compat == "openfedllm" and fed.sampling == "stratified":
        raise ConfigError("federation.compat=openfedllm samples clients like the paper's code "
                          "(random.seed(round)); it cannot also be sampling=stratified; set "
                          "federation.sampling=uniform or compat=none")


def _check_run_dir(cfg: RunConfig, run: RunDir, resume: bool) -> None:
    """Refuse to overwrite a checkpointed federation, or to resume another config's, up front.

    A rounds.jsonl without any checkpoint (a run that died before its first one) is not refused:
    nothing can be resumed from it, and the new run rewrites it.
    """
    latest = ckpt.find_latest(run.checkpoints)
    if not resume:
        if latest is not None or (run.checkpoints / ckpt.FINAL_DIR).exists():
            raise CheckpointError(f"{run.root} already holds a federation's checkpoints; pass "
                                  "resume=True to continue it, or use a new run directory")
        return
    if latest is not None:
        body = ckpt.read_checkpoint(latest, config_hash=config_hash(cfg))
        # Said here, in the process that waits on the run (the driver actor logs to Ray's logs).
        log.info("resume: %s, continuing at round %d", latest, int(body["rounds_done"]) + 1)


def _fp32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _to_ref(value: Any, convert: Callable[[Any], Any]) -> Any:
    if value is None or isinstance(value, ray.ObjectRef):
        return value
    return ray.put(convert(value))


def start_federation(
    cfg: RunConfig,
    run_dir: RunDir | str | Path,
    clients: Sequence[ClientSpec],
    eval_hook: EvalHook | None = None,
    resume: bool = False,
    *,
    stop_after: int | None = None,
    sampling_strata: Sequence[int] | None = None,
    pool: WorkerPool | None = None,
) -> tuple[Any, ray.ObjectRef]:
    """Start the driver actor and its ``run()``; return ``(driver handle, result ref)``.

    For callers that watch a run (``ray.get(driver.status.remote())``); most call
    :func:`run_federation`. Arguments as there.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    check_clients(cfg, clients)
    if pool is not None and not pool.serves(cfg):
        raise ConfigError("the given trainer worker pool was started from a config whose model, "
                          "lora, data, federation, resources or seed differ from this "
                          "federation's; start a pool from this config")
    _check_run_dir(cfg, run, resume)
    run.root.mkdir(parents=True, exist_ok=True)
    # Shards and initial states go to the object store once; the driver then holds only refs.
    put = [replace(c, shard=_to_ref(c.shard, list), state=_to_ref(c.state, _fp32))
           for c in sorted(clients, key=lambda c: c.client_id)]
    # The driver mostly waits on workers: it reserves no CPU, so the cluster (or a Tune trial's
    # bundles) needs room for the workers only, and a 2-core laptop runs 2 single-CPU workers.
    driver = FederationDriver.options(**driver_options(DRIVER_CPUS),
                                      name=driver_name(run.root)).remote(
        cfg, str(run.root), put, eval_hook, resume, stop_after,
        None if sampling_strata is None else list(sampling_strata), pool)
    return driver, driver.run.remote()


def driver_name(run_root: str | Path) -> str:
    """The Ray actor name of the federation driver of a run directory (``ray.get_actor``)."""
    import hashlib

    digest = hashlib.sha256(str(Path(run_root).resolve()).encode()).hexdigest()[:16]
    return f"ray_fedit_driver_{digest}"


def pool_placement_name(run_root: str | Path) -> str:
    """The placement group name of the trainer workers a run's driver starts for itself."""
    return f"{driver_name(run_root)}_workers"


def _release_lost_placement(run_root: str | Path) -> None:
    """Remove the workers' placement group a dead driver left behind: Ray removes a placement
    group with its creator's job, not with the actor that created it, so the next driver would
    otherwise wait for CPUs the dead one still holds."""
    from ray.util import get_placement_group, remove_placement_group

    try:
        remove_placement_group(get_placement_group(pool_placement_name(run_root)))
    except ValueError:  # none by that name: the driver died before placing its workers
        pass


def _wait(result: ray.ObjectRef, on_wait: Callable[[], None] | None,
          period_s: float = 1.0) -> FederationResult:
    if on_wait is not None:
        while not ray.wait([result], timeout=period_s)[0]:
            on_wait()
        on_wait()
    return ray.get(result)


def _driver_died(e: BaseException) -> bool:
    """Whether ``ray.get`` of the driver's ``run()`` failed because the driver process died (not
    because ``run()`` raised: Ray re-raises those as a ``RayTaskError`` of the same class)."""
    from ray.exceptions import RayActorError, RayTaskError

    return isinstance(e, RayActorError) and not isinstance(e, RayTaskError)


def run_federation(
    cfg: RunConfig,
    run_dir: RunDir | str | Path,
    clients: Sequence[ClientSpec],
    eval_hook: EvalHook | None = None,
    resume: bool = False,
    *,
    stop_after: int | None = None,
    sampling_strata: Sequence[int] | None = None,
    pool: WorkerPool | None = None,
    on_wait: Callable[[], None] | None = None,
) -> FederationResult:
    """Run FedIT for ``cfg.federation.rounds`` rounds on Ray and return the result.

    Ray must be initialized (``ray.init``) by the caller. The final global adapter is written in
    PEFT format to ``<run_dir>/checkpoints/final``.

    Args:
        cfg: the run's config.
        run_dir: the run directory (``RunDir`` or a path).
        clients: every registered client, ids ``0..num_clients-1``.
        eval_hook: ``hook(rounds_done, adapter_dir) -> metrics | None``, called inside the driver
            actor every ``federation.eval_every`` rounds (must be picklable); the metrics go into
            that round's record.
        resume: continue from the latest checkpoint (from scratch when there is none).
        stop_after: stop once this many rounds are done, writing a checkpoint (e.g. a preemptible
            time slice); ``resume=True`` continues it.
        sampling_strata: the ids that ``sampling: stratified`` treats as malicious; default the
            clients marked malicious. The paired no-attack federation passes the attacked run's
            malicious ids, so both federations sample the same clients in every round.
        pool: a started :class:`~ray_fedit.federation.pool.WorkerPool` to run on and leave
            running (the caller shuts it down), so federations run one after another load the
            model once; it must serve this config (:meth:`WorkerPool.serves`). None: a pool of
            this run's own.
        on_wait: called about once a second while the rounds run, and once at the end (the
            caller's progress display reads ``rounds.jsonl``).

    Returns:
        The :class:`FederationResult`.

    Raises:
        ConfigError: if the clients do not match the config, workers cannot be placed, or
            ``pool`` does not serve this config.
        CheckpointError: if the run directory already holds a federation and ``resume`` is False,
            or its checkpoint is corrupted or from another config.
        ClientFailure: if client failures break the failure policy or the quorum.
        AggregationError: if the aggregation rule's preconditions fail.
        ActorDiedError: if the driver actor died more than ``resources.max_restarts`` times (each
            time it dies, a new driver continues from the last checkpoint: bitwise the same run).
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    restarts = cfg.resources.max_restarts
    for attempt in range(restarts + 1):
        # After a lost driver, the next one continues from the last checkpoint it wrote.
        driver, result = start_federation(cfg, run, clients, eval_hook, resume or attempt > 0,
                                          stop_after=stop_after, sampling_strata=sampling_strata,
                                          pool=pool)
        try:
            return _wait(result, on_wait)
        except Exception as e:
            if not _driver_died(e) or attempt == restarts:
                raise
            log.warning("the federation driver died (%s); starting another from the last "
                        "checkpoint (restart %d of resources.max_restarts=%d)",
                        str(e).strip().splitlines()[0][:200], attempt + 1, restarts)
            if pool is None:
                _release_lost_placement(run.root)
        finally:
            ray.kill(driver)
    raise AssertionError("unreachable: the last attempt returns or raises")

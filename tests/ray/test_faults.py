"""Faults in the default layout: the only trainer worker is SIGKILLed mid-round.

The run must finish with the bitwise adapter of the fault-free run, whether the worker restarts
(``resources.max_restarts`` left) or has to be replaced (``max_restarts=0``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_fedit.federation import run_federation, start_federation
from tests.ray.test_federation import config, make_clients

ONE_WORKER = ("resources.num_workers=1", "federation.rounds=3", "federation.checkpoint_every=3")


@pytest.fixture(scope="module")
def fault_free(ray_session, tmp_path_factory):
    return run_federation(config(*ONE_WORKER), tmp_path_factory.mktemp("fault_free"),
                          make_clients(4, malicious=(1,)))


def _kill_in_round(ray_session, driver, result_ref, round_number: int) -> tuple[int, object]:
    killed = None
    deadline = time.monotonic() + 180
    while killed is None and time.monotonic() < deadline:
        status = ray_session.get(driver.status.remote())
        if status["round"] == round_number and status["inflight"]:
            killed = status["worker_pids"][0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.002)
    return killed, ray_session.get(result_ref, timeout=300)


@pytest.mark.parametrize("restarts", [2, 0])
def test_the_only_worker_killed_mid_round(ray_session, tmp_path, fault_free, restarts):
    """restarts=2: the retry waits for the restart; restarts=0: a replacement worker is started."""
    cfg = config(*ONE_WORKER, f"resources.max_restarts={restarts}")
    driver, result_ref = start_federation(cfg, tmp_path, make_clients(4, malicious=(1,)))
    try:
        killed, result = _kill_in_round(ray_session, driver, result_ref, 2)
        pids = ray_session.get(driver.status.remote())["worker_pids"]
    finally:
        ray_session.kill(driver)
    assert killed is not None, "the run never reached round 2"
    assert result.finished
    np.testing.assert_array_equal(result.global_vector, fault_free.global_vector)
    second = result.rounds[1]
    assert second["retries"] >= 1 and second["failed"] == []
    assert pids and pids[0] != killed


@pytest.mark.parametrize("workers,given_pool", [(1, False), (2, True)])
def test_the_driver_killed_mid_round(ray_session, tmp_path, tmp_path_factory, workers, given_pool):
    """The driver actor's process is SIGKILLed in round 2; another driver continues from the last
    checkpoint (round 1) with the same adapter, bitwise. Its own workers die with it and are
    started again; a caller's pool (the pipeline's layout) outlives it."""
    import threading

    from ray_fedit.federation.driver import driver_name
    from ray_fedit.federation.pool import WorkerPool

    overrides = (f"resources.num_workers={workers}", "federation.rounds=3",
                 "federation.checkpoint_every=1")
    cfg = config(*overrides)
    reference = run_federation(cfg, tmp_path_factory.mktemp("driver_fault_free"),
                               make_clients(4, malicious=(1,)))
    pool = WorkerPool(cfg) if given_pool else None
    out: dict[str, object] = {}

    def federate() -> None:
        try:
            out["result"] = run_federation(cfg, tmp_path, make_clients(4, malicious=(1,)), pool=pool)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            out["error"] = e

    thread = threading.Thread(target=federate)
    thread.start()
    killed = None
    deadline = time.monotonic() + 180
    try:
        while killed is None and time.monotonic() < deadline and thread.is_alive():
            try:
                status = ray_session.get(ray_session.get_actor(driver_name(tmp_path))
                                         .status.remote(), timeout=10)
            except (ValueError, ray_session.exceptions.RayError):
                continue  # not started yet
            if status["round"] == 2 and status["inflight"]:
                killed = status["pid"]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.002)
        thread.join(timeout=300)
    finally:
        if pool is not None:
            pool.shutdown()
    assert killed is not None, "the run never reached round 2"
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result.finished
    np.testing.assert_array_equal(result.global_vector, reference.global_vector)
    assert result.resumed_from == 1  # the checkpoint after round 1
    assert [r["round"] for r in result.rounds] == [1, 2, 3]
    # The dead driver's placement group was removed: every CPU is free again.
    deadline = time.monotonic() + 30
    while ray_session.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_session.available_resources().get("CPU", 0) == 2


# ------------------------------------------------------------------ generation and defense actors
class _Killer:
    """A thread that SIGKILLs the first process whose title starts with ``title``: once it runs
    a method (Ray titles a busy actor ``ray::Class.method``) when ``busy``, once ``once`` exists
    when given, and a seeded random delay (up to ``after`` s) after that. ``pid`` is set once it
    killed; :meth:`stop` ends the watch (the test's ``finally``), so it never outlives its test."""

    def __init__(self, title: str, *, after: float, seed: int, busy: bool = True,
                 once: Path | None = None) -> None:
        import random
        import threading

        self.title, self.busy, self.once = title, busy, once
        self.delay = random.Random(seed).uniform(0.0, after)
        self.pid: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _matches(self, cmd: str) -> bool:
        if not cmd.startswith(self.title):
            return False
        return not self.busy or cmd[len(self.title):len(self.title) + 1] == "."

    def _watch(self) -> None:
        import psutil

        while not self._stop.is_set():
            if self.once is not None and not self.once.exists():
                time.sleep(0.002)
                continue
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if self._matches(" ".join(proc.info["cmdline"] or [])):
                    time.sleep(self.delay)
                    try:
                        os.kill(proc.info["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.pid = proc.info["pid"]
                    return
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _tiny_generation(ray_session, *overrides: str):
    from ray_fedit.config import load_config
    from ray_fedit.generation.engine import generate

    cfg = load_config(None, ["model.name=tiny-random-llama", "generation.max_new_tokens=24",
                             "generation.batch_size=4", "generation.torch_threads=1", *overrides])
    rows = [{"prompt": f"Tell me about topic number {i}, in detail."} for i in range(48)]
    return lambda: generate(rows, prompt_field="prompt", model_cfg=cfg.model,
                            gen_cfg=cfg.generation, template="chat", seed=0)


@pytest.mark.parametrize("actors,title", [(1, "ray::ResidentGenerator"),
                                          (2, "ray::MapWorker(MapBatches(HFGenerator))")])
def test_a_generation_actor_killed_mid_call(ray_session, actors, title):
    """One actor: the resident generator is replaced and the call repeated. Two: a Ray Data actor
    pool, whose actors Ray Data restarts and whose lost batches it runs again. The answers are
    those of the fault-free call."""
    from ray_fedit.generation import resident

    run = _tiny_generation(ray_session, f"generation.num_actors={actors}")
    reference = run()
    resident.release()  # the next call starts a fresh resident actor, which gets killed
    killer = _Killer(title, after=0.3, seed=actors)
    try:
        answers = run()
    finally:
        killer.stop()
    assert killer.pid, f"no {title} process was seen busy"
    assert answers == reference


@pytest.mark.parametrize("workers", [1, 2])
def test_the_defense_worker_killed_mid_training(ray_session, tiny_config, tmp_path, workers,
                                                monkeypatch):
    """Ray Train restarts the group from the last checkpoint (a round end); the defended adapter
    and the loss curve are the fault-free ones, bitwise. With two data-parallel workers, one of
    them is killed."""
    from ray_fedit.defenses import posthoc as posthoc_module
    from ray_fedit.models.lora import load_adapter
    from ray_fedit.registry import DEFENSES
    from tests.ray.test_defense import RECORDS, _cfg, _start_adapter

    # a surviving rank stuck in a collective fails in 120 s instead of torch's 30 min
    monkeypatch.setattr(posthoc_module, "PROCESS_GROUP_TIMEOUT_S", 120)
    cfg = _cfg(tiny_config, steps=60, steps_per_round=3, checkpoint_every=3, num_workers=workers)
    _start_adapter(cfg, tmp_path / "global")
    posthoc = DEFENSES.get("posthoc")
    reference = posthoc(cfg, RECORDS, global_adapter=tmp_path / "global", out_dir=tmp_path / "ref")
    # Killed in the second half: after the checkpoint of step 30, within a fraction of a round.
    # Ray Train runs the loop in a thread of the worker actor, whose title then reads idle.
    killer = _Killer("ray::RayTrainWorker", after=0.05, seed=3, busy=False,
                     once=tmp_path / "faulty" / "step_0030" / "defense_losses.json")
    try:
        result = posthoc(cfg, RECORDS, global_adapter=tmp_path / "global",
                         out_dir=tmp_path / "faulty")
    finally:
        killer.stop()
    assert killer.pid, "no Ray Train worker was seen"
    assert reference.resumed_after == []
    # from the last checkpoint Ray Train had persisted (step 30 may still be on its way)
    assert len(result.resumed_after) == 1 and 3 <= result.resumed_after[0] < 60
    assert result.losses == reference.losses
    for step in (30, 60):
        got, _ = load_adapter(result.checkpoints[step])
        want, _ = load_adapter(reference.checkpoints[step])
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)

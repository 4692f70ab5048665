"""Placement on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``, logical GPUs).

A Cluster needs its own Ray instance, and this pytest process may hold the session-wide one
(``ray_session``), so the cluster runs in a subprocess: this file run as a script starts a head
(CPU only) and two nodes with 2 logical GPUs each, places trainer-style actors through
``ray_fedit.resources`` (PACK, SPREAD, fractional GPUs, infeasible and busy requests, a Tune-like
trial), then adds a spare node and removes a trainer worker's node in the middle of a federated run
(tiny model), prints one JSON line of observations, and shuts down its own cluster.
``RAY_TMPDIR`` points that subprocess at a private temp folder, so its session files and its
``ray_current_cluster`` file never touch another Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

MARKER = "CLUSTER_PROBE_RESULT "
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------ the probe (subprocess)
def _probe() -> dict:  # pragma: no cover - runs in the subprocess
    import ray
    from ray.cluster_utils import Cluster
    from ray.util import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from ray_fedit.config import ResourcesConfig
    from ray_fedit.resources import (
        ResourceError,
        acquire_worker_placement,
        cluster_nodes,
        driver_options,
        placement_nodes,
        worker_bundles,
    )

    @ray.remote
    class Trainer:
        def where(self) -> dict:
            ctx = ray.get_runtime_context()
            return {"node": ctx.get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def place(placement) -> list[dict]:
        actors = [Trainer.options(**placement.worker_options(i)).remote()
                  for i in range(placement.num_workers)]
        try:
            return ray.get([a.where.remote() for a in actors], timeout=60)
        finally:
            for a in actors:
                ray.kill(a)

    def wait_all_gpus_free(gpus: int = 4) -> None:
        # Freed bundles come back asynchronously; a soft strategy (SPREAD) placed while the
        # scheduler still sees the last scenario's GPUs as busy would fall back to packing.
        deadline = time.monotonic() + 20
        while ray.available_resources().get("GPU", 0) < gpus and time.monotonic() < deadline:
            time.sleep(0.1)

    def error_of(fn) -> dict:
        start = time.monotonic()
        try:
            fn()
        except ResourceError as e:
            return {"error": str(e), "seconds": time.monotonic() - start}
        return {"error": None, "seconds": time.monotonic() - start}

    out: dict = {"timings": {}}
    t0 = time.monotonic()

    def lap(name: str) -> None:
        out["timings"][name] = round(time.monotonic() - t0, 2)

    with socket.socket() as sock:  # the agent's default port (52365) may be another instance's
        sock.bind(("127.0.0.1", 0))
        agent_port = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
        "dashboard_agent_listen_port": agent_port})
    gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        lap("cluster_up")
        out["head"] = cluster.head_node.node_id
        out["gpu_nodes"] = sorted(n.node_id for n in gpu_nodes)
        out["nodes_seen"] = len([n for n in cluster_nodes() if n.name.startswith("node ")])

        for strategy in ("PACK", "SPREAD"):
            wait_all_gpus_free()
            cfg = ResourcesConfig(num_workers=2, cpus_per_worker=1, gpus_per_worker=1,
                                  placement_strategy=strategy)
            with acquire_worker_placement(cfg, timeout_s=30) as placement:
                out[strategy] = {"actors": place(placement),
                                 "bundles": placement_nodes(placement),
                                 "owned": placement.owned}
            out[strategy]["released"] = placement_group_table(
                placement.placement_group)["state"]
            lap(strategy)

        out["strict_spread_3"] = error_of(lambda: acquire_worker_placement(ResourcesConfig(
            num_workers=3, gpus_per_worker=1, placement_strategy="STRICT_SPREAD"), timeout_s=30))
        out["three_gpus"] = error_of(lambda: acquire_worker_placement(
            ResourcesConfig(gpus_per_worker=3), timeout_s=30))
        out["strict_pack_4"] = error_of(lambda: acquire_worker_placement(ResourcesConfig(
            num_workers=2, gpus_per_worker=2, placement_strategy="STRICT_PACK"), timeout_s=30))

        lap("infeasible")
        wait_all_gpus_free()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = ResourcesConfig(num_workers=4, cpus_per_worker=0.5, gpus_per_worker=0.5,
                                  placement_strategy="STRICT_PACK")
            with acquire_worker_placement(cfg, timeout_s=30) as placement:
                out["fractional"] = {"actors": place(placement),
                                     "warnings": [str(w.message) for w in caught]}

        lap("fractional")
        # Feasible on paper but every GPU is held by someone else: the timeout answers.
        wait_all_gpus_free()
        holder = placement_group([{"GPU": 2.0}, {"GPU": 2.0}], strategy="STRICT_SPREAD")
        ray.get(holder.ready(), timeout=30)
        out["busy"] = error_of(lambda: acquire_worker_placement(
            ResourcesConfig(gpus_per_worker=1), timeout_s=1.5))
        out["busy"]["pgs_left"] = sum(
            1 for t in placement_group_table().values() if t["state"] != "REMOVED")
        remove_placement_group(holder)
        lap("busy")

        # A Ray Tune trial: the run executes inside a capturing placement group that reserved
        # trial_bundles() (an empty head, as Tune runs it: bundle 0 with no resources); the
        # workers must use its bundles 0..n-1 and create no placement group.
        cfg = ResourcesConfig(num_workers=2, cpus_per_worker=1, gpus_per_worker=1,
                              placement_strategy="SPREAD")
        wait_all_gpus_free()
        trial = placement_group(worker_bundles(cfg), strategy="SPREAD")
        ray.get(trial.ready(), timeout=30)

        @ray.remote(num_cpus=0)
        def trial_body() -> dict:
            before = len(placement_group_table())
            placement = acquire_worker_placement(cfg, timeout_s=30)
            actors = place(placement)
            placement.release()  # not owned: must leave the trial's group alone
            return {"owned": placement.owned, "indices": placement.bundle_indices,
                    "actors": actors, "new_groups": len(placement_group_table()) - before,
                    "trial_state": placement_group_table(
                        placement.placement_group)["state"],
                    "driver": driver_options()}

        in_trial = PlacementGroupSchedulingStrategy(
            trial, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
        out["trial"] = ray.get(trial_body.options(scheduling_strategy=in_trial).remote(),
                               timeout=60)
        out["trial"]["bundle_nodes"] = placement_group_table(trial)["bundles_to_node_id"]
        remove_placement_group(trial)
        lap("trial")

        spare = cluster.add_node(num_cpus=2, num_gpus=2)  # room for a lost worker to restart on
        cluster.wait_for_nodes()
        out["spare"] = spare.node_id
        wait_all_gpus_free(6)
        out["node_loss"] = _node_loss(cluster, [*gpu_nodes, spare])
        lap("node_loss")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def _node_loss(cluster, gpu_nodes) -> dict:  # pragma: no cover - runs in the subprocess
    """A federated run (tiny model, 2 trainer workers on distinct GPU nodes) loses the node of one
    worker in round 2: the round retries that worker's clients on the other worker, the lost worker
    restarts on the GPU node left free (three GPU nodes, two workers), and the final adapter equals
    the fault-free run's, bit for bit.
    25 local steps keep a client task running long enough (~0.5 s) for the node to die under it."""
    import numpy as np
    import psutil
    import ray
    from ray._private import ray_constants

    from ray_fedit.config import load_config
    from ray_fedit.data.schema import make_record
    from ray_fedit.federation import ClientSpec, run_federation, start_federation

    cfg = load_config(None, [
        "model.name=tiny-random-llama", "defense.name=none", "seed=3",
        "federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=3",
        "federation.local_steps=25", "federation.batch_size=2", "federation.lr=0.01",
        "federation.on_client_failure=retry", "data.max_seq_len=48", "resources.num_workers=2",
        "resources.cpus_per_worker=1", "resources.gpus_per_worker=1", "resources.torch_threads=1",
        "resources.placement_strategy=STRICT_SPREAD"])
    clients = [ClientSpec(c, [make_record(f"Question {c}.{i}: what is {i} + {c}?",
                                          f"It is {i + c}.", source="test")
                              for i in range(6)], is_malicious=False)
               for c in range(4)]
    tmp = Path(os.environ["RAY_TMPDIR"])
    start = time.monotonic()
    reference = run_federation(cfg, tmp / "reference", clients)
    reference_s = time.monotonic() - start

    def pids_of(node) -> set[int]:
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        return {p.pid for p in psutil.Process(raylet).children(recursive=True)}

    out: dict = {"removed": None, "statuses_seen": 0, "reference_s": round(reference_s, 1)}
    start = time.monotonic()
    driver, result_ref = start_federation(cfg, tmp / "faulty", clients)
    try:
        deadline = time.monotonic() + 180
        while out["removed"] is None and time.monotonic() < deadline:
            status = ray.get(driver.status.remote())
            out["statuses_seen"] += 1
            if status["round"] == 2 and status["phase"] == "training":
                for node in gpu_nodes:
                    pids = pids_of(node)
                    if status["pid"] not in pids and pids & set(status["worker_pids"]):
                        out["removed"] = node.node_id
                        out["lost_worker"] = next(i for i, pid in enumerate(status["worker_pids"])
                                                  if pid in pids)
                        cluster.remove_node(node)
                        break
            time.sleep(0.01)
        result = ray.get(result_ref, timeout=300)
    finally:
        ray.kill(driver)
    out["faulty_s"] = round(time.monotonic() - start, 1)
    out["identical"] = bool(np.array_equal(result.global_vector, reference.global_vector))
    out["rounds_completed"] = result.rounds_completed
    out["round2"] = {"retries": result.rounds[1]["retries"], "failed": result.rounds[1]["failed"],
                     "workers": [c["worker"] for c in result.rounds[1]["clients"]]}
    out["round3_workers"] = sorted(c["worker"] for c in result.rounds[2]["clients"])
    out["alive_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    return out


# ------------------------------------------------------------------------ the tests (pytest)
@pytest.fixture(scope="module")
def probe() -> dict:
    tmp = tempfile.mkdtemp(prefix="rfc", dir="/tmp")  # short: Ray's socket paths have a length cap
    env = {**os.environ, "RAY_TMPDIR": tmp, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=480)
        assert not (Path(tmp) / "ray" / "ray_current_cluster").exists(), "address file left"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads(lines[-1][len(MARKER):])


def test_cluster_has_three_nodes(probe):
    assert probe["nodes_seen"] == 3 and len(probe["gpu_nodes"]) == 2


def test_pack_puts_workers_on_one_gpu_node(probe):
    nodes = {a["node"] for a in probe["PACK"]["actors"]}
    assert len(nodes) == 1 and nodes <= set(probe["gpu_nodes"])
    assert sorted(g for a in probe["PACK"]["actors"] for g in a["gpus"]) == ["0", "1"]
    assert [a["node"] for a in probe["PACK"]["actors"]] == probe["PACK"]["bundles"]
    assert probe["PACK"]["owned"] and probe["PACK"]["released"] == "REMOVED"


def test_spread_puts_workers_on_distinct_gpu_nodes(probe):
    nodes = [a["node"] for a in probe["SPREAD"]["actors"]]
    assert sorted(nodes) == probe["gpu_nodes"]
    assert all(len(a["gpus"]) == 1 for a in probe["SPREAD"]["actors"])
    assert probe["SPREAD"]["released"] == "REMOVED"


@pytest.mark.parametrize(("case", "expected"), [
    ("strict_spread_3", ["3 x {CPU 1, GPU 1} with strategy STRICT_SPREAD",
                         "needs 3 distinct nodes", "only 2 node(s)"]),
    ("three_gpus", ["1 x {CPU 1, GPU 3}", "no node can hold one bundle", "GPU 2)"]),
    ("strict_pack_4", ["STRICT_PACK needs all bundles on one node (CPU 2, GPU 4)"]),
])
def test_infeasible_requests_fail_fast_and_say_why(probe, case, expected):
    result = probe[case]
    assert result["error"] is not None, case
    for text in expected:
        assert text in result["error"]
    assert "the cluster has 3 alive node(s)" in result["error"]
    assert "alive total: CPU 5, GPU 4" in result["error"]
    assert result["seconds"] < 5, "infeasible requests must not wait for the placement timeout"


def test_fractional_gpus_share_and_warn(probe):
    actors = probe["fractional"]["actors"]
    assert len({a["node"] for a in actors}) == 1  # STRICT_PACK: one node
    gpu_ids = sorted(g for a in actors for g in a["gpus"])
    assert len(gpu_ids) == 4 and len(set(gpu_ids)) == 2  # two workers per GPU
    assert any("Ray does not isolate GPU memory" in w for w in probe["fractional"]["warnings"])


def test_busy_cluster_times_out_and_cleans_up(probe):
    busy = probe["busy"]
    assert busy["error"] and "not ready after" in busy["error"]
    assert "GPU" not in busy["error"].split("has only")[1].split("free now")[0]  # none free
    assert 1.4 <= busy["seconds"] < 10
    assert busy["pgs_left"] == 1  # the holder only: the timed-out group was removed


def test_tune_trial_reuses_its_placement_group(probe):
    trial = probe["trial"]
    assert trial["owned"] is False and trial["indices"] == [0, 1]
    assert trial["new_groups"] == 0 and trial["trial_state"] == "CREATED"
    bundle_nodes = trial["bundle_nodes"]
    assert [a["node"] for a in trial["actors"]] == [bundle_nodes["0"], bundle_nodes["1"]]
    assert sorted(a["node"] for a in trial["actors"]) == probe["gpu_nodes"]  # SPREAD
    assert trial["driver"]["num_gpus"] == 0



def test_losing_a_node_mid_run_retries_and_matches_the_fault_free_run(probe):
    loss = probe["node_loss"]
    # STRICT_SPREAD may put the two workers on any two of the three GPU nodes (the spare too).
    gpu_nodes = [*probe["gpu_nodes"], probe["spare"]]
    assert loss["removed"] in gpu_nodes, ("no worker node was removed in round 2", loss)
    assert loss["removed"] not in loss["alive_nodes"]
    assert sum(n in loss["alive_nodes"] for n in gpu_nodes) == 2, loss  # room to restart on
    assert loss["rounds_completed"] == 3, loss
    assert loss["round2"]["retries"] >= 1 and loss["round2"]["failed"] == [], loss
    survivor = 1 - loss["lost_worker"]
    assert survivor in loss["round2"]["workers"], loss
    assert loss["identical"], "the final adapter differs from the fault-free run's"


if __name__ == "__main__":
    print(MARKER + json.dumps(_probe()), flush=True)

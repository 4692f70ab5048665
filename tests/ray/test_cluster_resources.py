"""ray_fedit.resources planning logic: bundles, GPU sharing warning, and the fail-fast feasibility
check, against hand-built clusters and brute force. No Ray instance is started here."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import pytest

from ray_fedit.config import ResourcesConfig
from ray_fedit.errors import RayFeditError
from ray_fedit.resources import (
    GPU_SHARING_WARNING,
    GpuSharingWarning,
    NodeCapacity,
    ResourceError,
    check_feasible,
    driver_options,
    format_resources,
    gpu_sharing_message,
    infeasibility,
    nodes_from_autoscaler,
    nodes_from_ray,
    warn_if_gpu_shared,
    worker_bundles,
    worker_resources,
)
from tests.conftest import ROOT

HEAD = NodeCapacity("head", {"CPU": 2.0, "memory": 8 * 2**30})
GPU_A = NodeCapacity("gpu-a", {"CPU": 4.0, "GPU": 2.0})
GPU_B = NodeCapacity("gpu-b", {"CPU": 4.0, "GPU": 2.0})
CLUSTER = [HEAD, GPU_A, GPU_B]
ONE_GPU = {"CPU": 1.0, "GPU": 1.0}


def res(**kw) -> ResourcesConfig:
    return ResourcesConfig(**kw)


def test_worker_bundles_follow_the_config():
    assert worker_resources(res()) == {"CPU": 1.0}  # no GPU key when none is asked for
    assert worker_bundles(res(num_workers=3, cpus_per_worker=2, gpus_per_worker=1)) == [
        {"CPU": 2.0, "GPU": 1.0}] * 3
    assert worker_resources(res(gpus_per_worker=0.25)) == {"CPU": 1.0, "GPU": 0.25}
    assert driver_options() == {"num_cpus": 1.0, "num_gpus": 0}
    assert driver_options(0.5)["num_cpus"] == 0.5


def test_fractional_gpus_above_one_are_refused():
    with pytest.raises(ResourceError, match="whole number of GPUs"):
        worker_resources(res(gpus_per_worker=1.5))
    assert worker_resources(res(gpus_per_worker=2))["GPU"] == 2.0
    assert issubclass(ResourceError, RayFeditError)  # the CLI prints it as one line


def test_gpu_sharing_warning_only_for_fractions():
    for whole in (0, 1, 2):
        assert gpu_sharing_message(res(gpus_per_worker=whole)) is None
    message = gpu_sharing_message(res(gpus_per_worker=0.5))
    assert GPU_SHARING_WARNING in message and "up to 2 trainer workers share one GPU" in message
    assert "up to 3 " in gpu_sharing_message(res(gpus_per_worker=0.33))
    with pytest.warns(GpuSharingWarning, match=GPU_SHARING_WARNING):
        warn_if_gpu_shared(res(gpus_per_worker=0.25))


@pytest.mark.parametrize(("bundles", "strategy", "feasible"), [
    ([ONE_GPU] * 4, "PACK", True),
    ([ONE_GPU] * 4, "SPREAD", True),
    ([ONE_GPU] * 5, "PACK", False),             # only 4 GPUs in all
    ([ONE_GPU] * 2, "STRICT_SPREAD", True),
    ([ONE_GPU] * 3, "STRICT_SPREAD", False),    # only 2 GPU nodes
    ([{"CPU": 1.0}] * 3, "STRICT_SPREAD", True),  # the head counts for CPU-only bundles
    ([{"CPU": 1.0}] * 4, "STRICT_SPREAD", False),
    ([ONE_GPU] * 2, "STRICT_PACK", True),
    ([ONE_GPU] * 3, "STRICT_PACK", False),
    ([{"CPU": 1.0, "GPU": 3.0}], "PACK", False),  # no node has 3 GPUs
    ([{"CPU": 4.0, "GPU": 0.5}] * 2, "PACK", True),
    ([{"CPU": 4.0, "GPU": 0.5}] * 3, "PACK", False),  # CPU-bound: 4 CPUs per GPU node
    ([{"CPU": 1.0, "TPU": 1.0}], "PACK", False),  # a resource nobody has
])
def test_infeasibility_on_a_known_cluster(bundles, strategy, feasible):
    assert (infeasibility(bundles, strategy, CLUSTER) is None) is feasible


def test_error_names_the_request_the_reason_every_node_and_a_fix():
    with pytest.raises(ResourceError) as err:
        check_feasible([ONE_GPU] * 3, "STRICT_SPREAD", CLUSTER)
    text = str(err.value)
    assert "3 bundle(s): 3 x {CPU 1, GPU 1} with strategy STRICT_SPREAD" in text
    assert "needs 3 distinct nodes" in text and "only 2 node(s)" in text
    assert "gpu-a: CPU 4, GPU 2" in text and "head: CPU 2, memory 8.0 GiB" in text
    assert "alive total: CPU 10, GPU 4" in text and "fix:" in text
    with pytest.raises(ResourceError, match=r"no node can hold one bundle \{CPU 1, GPU 3\}.*GPU 2"):
        check_feasible([{"CPU": 1.0, "GPU": 3.0}], "PACK", CLUSTER)
    check_feasible([ONE_GPU] * 4, "SPREAD", CLUSTER)  # no error


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="STRICT_SPREAD"):
        infeasibility([ONE_GPU], "RANDOM", CLUSTER)


def test_autoscaler_groups_count_as_future_nodes():
    head_only = nodes_from_ray([
        {"NodeID": "aa" * 14, "Alive": True, "NodeManagerAddress": "10.0.0.1",
         "Resources": {"CPU": 4.0, "node:10.0.0.1": 1.0}},
        {"NodeID": "bb" * 14, "Alive": False, "NodeManagerAddress": "10.0.0.2",
         "Resources": {"CPU": 8.0, "GPU": 8.0}},  # dead: never counts
    ])
    assert [n.resources for n in head_only] == [{"CPU": 4.0, "node:10.0.0.1": 1.0}]
    assert infeasibility([ONE_GPU], "PACK", head_only) is not None
    groups = nodes_from_autoscaler([("gpu_1x", {"CPU": 4.0, "GPU": 1.0}, 4),
                                    ("never", {"CPU": 64.0, "GPU": 8.0}, 0)])
    assert [g.name for g in groups] == ["autoscaler group gpu_1x"]
    nodes = head_only + groups
    assert infeasibility([ONE_GPU] * 4, "STRICT_SPREAD", nodes) is None
    assert infeasibility([ONE_GPU] * 5, "STRICT_SPREAD", nodes) is not None
    assert infeasibility([{"CPU": 1.0, "GPU": 2.0}], "PACK", nodes) is not None
    unbounded = head_only + nodes_from_autoscaler([("gpu", {"CPU": 4.0, "GPU": 1.0}, -1)])
    assert infeasibility([ONE_GPU] * 50, "STRICT_SPREAD", unbounded) is None
    assert "x unbounded" in unbounded[1].describe()


def test_format_hides_node_markers_and_shows_bytes():
    text = format_resources({"node:1.2.3.4": 1.0, "GPU": 1.0, "object_store_memory": 2**30,
                             "CPU": 0.5, "accelerator_type:A10G": 1.0,
                             "GPU_group_0_cfdcb36a4c86d0ef76459317509801000000": 2.0,
                             "bundle_group_cfdcb36a4c86d0ef76459317509801000000": 1000.0})
    assert text == "CPU 0.5, GPU 1, object_store_memory 1.0 GiB"


def _brute_force(bundles, caps, strategy) -> bool:
    """Every assignment of bundles to nodes: the definition the planner must agree with."""
    keys = {k for b in bundles for k in b}
    for assign in itertools.product(range(len(caps)), repeat=len(bundles)):
        if strategy == "STRICT_SPREAD" and len(set(assign)) < len(assign):
            continue
        if strategy == "STRICT_PACK" and len(set(assign)) > 1:
            continue
        used = [dict.fromkeys(keys, 0.0) for _ in caps]
        for b, n in zip(bundles, assign, strict=True):
            for k, v in b.items():
                used[n][k] += v
        if all(used[n][k] <= caps[n].get(k, 0.0) + 1e-9 for n in range(len(caps)) for k in keys):
            return True
    return False


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
def test_planner_agrees_with_brute_force(strategy):
    rng = random.Random(7)
    disagreements = []
    for _ in range(300):
        caps = [{"CPU": float(rng.randint(0, 4)), "GPU": float(rng.randint(0, 3))}
                for _ in range(rng.randint(1, 3))]
        bundles = [{"CPU": float(rng.randint(0, 2)), "GPU": rng.choice([0.0, 0.5, 1.0, 2.0])}
                   for _ in range(rng.randint(1, 5))]
        nodes = [NodeCapacity(f"n{i}", c) for i, c in enumerate(caps)]
        planned = infeasibility(bundles, strategy, nodes) is None
        if planned != _brute_force(bundles, caps, strategy):
            disagreements.append((caps, bundles, planned))
    assert not disagreements, disagreements[:3]


def test_imports_without_ray():
    code = ("import sys\n"
            "class B:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'ray' or name.startswith('ray.'):\n"
            "            raise ImportError('ray is blocked')\n"
            "sys.meta_path.insert(0, B())\n"
            "from ray_fedit.resources import NodeCapacity, infeasibility\n"
            "print(infeasibility([{'GPU': 1.0}], 'PACK', [NodeCapacity('n', {'CPU': 1.0})]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no node can hold one bundle {GPU 1}" in out.stdout


@pytest.mark.parametrize("use_gpu", [False, True])
def test_a_sweep_counts_the_defense_workers_as_ray_train_reserves_them(use_gpu):
    """What ``ray-fedit sweep`` leaves room for equals what Ray Train reserves for the defense's
    worker group (its default of one GPU per worker with ``use_gpu``)."""
    from ray.train import ScalingConfig

    from ray_fedit.config import load_config
    from ray_fedit.resources import sum_bundles
    from ray_fedit.sweeps import outside_bundles

    cfg = load_config(None, ["resources.cpus_per_worker=2", "defense.num_workers=4",
                             f"defense.use_gpu={str(use_gpu).lower()}"])
    train = ScalingConfig(num_workers=4, use_gpu=use_gpu, resources_per_worker={"CPU": 2.0})
    reserved = {k: v for k, v in train.total_resources.items() if v}
    assert sum_bundles(outside_bundles(cfg)) == reserved == ({"CPU": 8.0, "GPU": 4.0} if use_gpu
                                                             else {"CPU": 8.0})

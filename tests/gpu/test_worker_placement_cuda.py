"""Trainer workers are placed from ``resources.gpus_per_worker`` and really train on ``cuda:0``.

Starts the public :class:`ray_fedit.federation.pool.WorkerPool` (a placement group of one bundle,
one ``TrainerWorker`` actor) on the tiny random Llama, inspects the actor from inside with Ray's
``__ray_call__``, and runs one client task. Needs Ray (skipped without it: the accelerator image
has none).
"""

from __future__ import annotations

import pytest

from tests.gpu.tiny_models import has_module

pytestmark = [
    pytest.mark.usefixtures("needs_bundled_tokenizer"),
    pytest.mark.skipif(not has_module("ray"), reason="trainer workers are Ray actors: needs Ray "
                       "(pip install 'ray[default,train,data]==2.60.0')"),
]


def _pool(cfg, gpus: float):
    from ray_fedit.federation.pool import WorkerPool

    res = cfg.resources.model_copy(update={"num_workers": 1, "gpus_per_worker": gpus,
                                           "cpus_per_worker": 1.0})
    pool = WorkerPool(cfg.model_copy(update={"resources": res}))
    pool.wait_ready()
    return pool


def _inside(worker):
    """What the actor sees: its GPU ids, CUDA_VISIBLE_DEVICES and where its model lives."""
    import ray

    def probe(self):
        import os

        import ray as ray_in_actor
        import torch

        devices = {str(p.device) for p in self.model.parameters()}
        return {"gpu_ids": [str(i) for i in ray_in_actor.get_gpu_ids()],
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "param_devices": devices,
                "lora_devices": {str(p.device) for p in self.view.params},
                "allocated": torch.cuda.memory_allocated(0) if torch.cuda.is_available() else 0}

    return ray.get(worker.__ray_call__.remote(probe))


def _one_task(pool):
    import numpy as np
    import ray

    from ray_fedit.data.schema import make_record
    from ray_fedit.federation.state import ClientTask

    records = [make_record(f"Say {i}.", f"{i}.", source="normal") for i in range(4)]
    update = ray.get(pool.workers[0].train_client.remote(ClientTask(0, 0, 1e-3), pool.initial,
                                                         [records]))
    assert np.isfinite(update.delta).all() and np.abs(update.delta).max() > 0
    return update


def test_a_worker_with_one_gpu_trains_on_cuda_0(ray_gpu, tiny_run_config, device):
    if device.type != "cuda":
        pytest.skip("checks CUDA placement")
    pool = _pool(tiny_run_config, 1)
    try:
        assert pool.devices == ["cuda"]
        seen = _inside(pool.workers[0])
        assert len(seen["gpu_ids"]) == 1 and seen["visible"] == seen["gpu_ids"][0]
        assert seen["param_devices"] == {"cuda:0"} == seen["lora_devices"]
        assert seen["allocated"] > 0
        update = _one_task(pool)
        assert update.stats["worker"] == 0
        assert _inside(pool.workers[0])["lora_devices"] == {"cuda:0"}
    finally:
        pool.shutdown()


def test_a_worker_without_gpus_stays_on_cpu(ray_gpu, tiny_run_config):
    pool = _pool(tiny_run_config, 0)
    try:
        assert pool.devices == ["cpu"]
        seen = _inside(pool.workers[0])
        assert seen["gpu_ids"] == [] and seen["param_devices"] == {"cpu"}
        _one_task(pool)
    finally:
        pool.shutdown()

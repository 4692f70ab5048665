"""Test-wide settings: offline hubs, a private cache, and the tier markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

ROOT = Path(__file__).resolve().parents[1]
_TIERS = {"ray": "ray", "slow": "slow", "gpu": "gpu"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder (tests/ray -> ray, ...), and skip gpu tests without CUDA."""
    import torch

    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, _TIERS[tier]))
        if tier == "gpu" and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs one (ray.init costs 2-3.5 s, shutdown
    1.5-3 s); ``address="local"`` never joins another Ray instance running on the machine."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_config():
    """A RunConfig for the tiny random model with small, fast settings."""
    from ray_fedit.config import load_config

    return load_config(None, [
        "model.name=tiny-random-llama", "federation.num_clients=4", "federation.clients_per_round=2",
        "federation.rounds=2", "federation.local_steps=2", "federation.batch_size=2",
        "data.max_seq_len=64", "data.samples_per_client=8", "resources.torch_threads=1",
        "defense.name=none",
    ])

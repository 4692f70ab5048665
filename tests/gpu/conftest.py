"""Fixtures of the GPU tier (``tests/gpu``, marker ``gpu``).

``tests/conftest.py`` marks every test here ``gpu`` and skips it when ``torch.cuda.is_available()``
is false, so on a CPU machine the tier is collected (without importing deepspeed, vllm or Ray, and
without touching CUDA) and reported as skipped. Most tests need only torch, transformers, peft,
safetensors and pydantic; the few that need Ray, DeepSpeed or vLLM skip with the reason when those
are missing. ``tests/gpu/device_check.sh`` runs the tier and writes a summary.

``RAY_FEDIT_GPU_TEST_DEVICE`` (default ``cuda``) is the device the tests put their models on; ``cpu``
exercises the tier's logic on a CPU machine (where CUDA-vs-CPU comparisons hold trivially), with
``--confcutdir=tests/gpu`` so that the CUDA skip of ``tests/conftest.py`` is not loaded.
"""

from __future__ import annotations

import os

import pytest

from tests.gpu.tiny_models import NO_BUNDLED_TOKENIZER, bundled_tokenizer_available

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def device():
    import torch

    return torch.device(os.environ.get("RAY_FEDIT_GPU_TEST_DEVICE", "cuda"))


@pytest.fixture
def strict_fp32():
    """IEEE fp32 matmuls for the test (no TF32), restored afterwards: fp32 comparisons with CPU
    results assume it (TF32 would round matmul inputs to 10 mantissa bits)."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture(scope="session")
def needs_bundled_tokenizer():
    if not bundled_tokenizer_available():
        pytest.skip(NO_BUNDLED_TOKENIZER)


@pytest.fixture(scope="session")
def ray_gpu():
    """A local Ray instance seeing this machine's GPUs (reused when one is running already)."""
    ray = pytest.importorskip("ray", reason="needs Ray (pip install 'ray[default,train,data]==2.60.0'); "
                              "the accelerator image has none")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=min(4, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def tiny_run_config():
    """A RunConfig for the tiny random model with small, fast settings (as tests/conftest.py's
    ``tiny_config``, which is not loaded under ``--confcutdir=tests/gpu``)."""
    from ray_fedit.config import load_config

    return load_config(None, [
        "model.name=tiny-random-llama", "federation.num_clients=4", "federation.clients_per_round=2",
        "federation.rounds=2", "federation.local_steps=2", "federation.batch_size=2",
        "data.max_seq_len=64", "data.samples_per_client=8", "resources.torch_threads=1",
        "defense.name=none",
    ])

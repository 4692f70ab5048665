"""Faults in the default layout: the only trainer worker is SIGKILLed mid-round.

The run must finish with the bitwise adapter of the fault-free run, whether the worker restarts
(``resources.max_restarts`` left) or has to be replaced (``max_restarts=0``).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

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

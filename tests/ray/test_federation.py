"""The federation engine on a local Ray with the tiny random Llama.

One uninterrupted 4-round run on 2 workers is the reference; a 1-worker run, a stopped-and-resumed
run and a run whose worker is SIGKILLed mid-round must all end with a bitwise identical adapter.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from ray_fedit.config import load_config
from ray_fedit.data.schema import make_record
from ray_fedit.errors import CheckpointError, ClientFailure
from ray_fedit.federation import ClientSpec, run_federation, start_federation
from ray_fedit.models.lora import load_adapter

BASE = [
    "model.name=tiny-random-llama", "defense.name=none", "seed=3",
    "federation.num_clients=4", "federation.clients_per_round=4", "federation.rounds=4",
    "federation.local_steps=2", "federation.batch_size=2", "federation.lr=0.01",
    "data.max_seq_len=48", "resources.num_workers=2", "resources.torch_threads=1",
]


def config(*overrides: str):
    return load_config(None, [*BASE, *overrides])


def make_clients(num_clients: int, per_client=lambda c: 6, malicious=(), **state):
    return [ClientSpec(c, [make_record(f"Question {c}.{i}: what is {i} + {c}?",
                                       f"It is {i + c}. Client {c} says so.", source="test",
                                       is_harmful=c in malicious)
                           for i in range(per_client(c))],
                       is_malicious=c in malicious, state=state.get(str(c)))
            for c in range(num_clients)]


def read_rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """4 rounds, 4 clients, 2 workers, no interruption."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run_federation(config(), run_dir, make_clients(4, malicious=(1,)))


def test_reference_run_writes_rounds_checkpoints_and_final_adapter(reference):
    run_dir = reference.run_dir
    assert reference.finished and reference.rounds_completed == 4
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and rounds == reference.rounds
    for r in rounds:
        assert r["sampled"] == r["aggregated"] == [0, 1, 2, 3]
        assert r["rejected"] == [] and r["failed"] == []
        assert sorted(r["assignment"].values()) == [0, 0, 1, 1]  # 2 clients per worker
        weights = [c["weight"] for c in r["clients"]]
        assert sum(weights) == pytest.approx(1.0) and weights[0] == pytest.approx(0.25)
        for c in r["clients"]:
            assert c["norm"] > 0 and -1 <= c["cosine"] <= 1 and c["bytes"] > 0
            assert c["examples"] == 4 and c["loss"] > 0
        assert r["bytes"] == sum(c["bytes"] for c in r["clients"])
    assert [c["malicious"] for c in rounds[0]["clients"]] == [False, True, False, False]
    # the learning rate follows the per-round cosine schedule
    assert rounds[0]["lr"] == pytest.approx(0.01)
    assert rounds[2]["lr"] == pytest.approx(1e-6 + 0.5 * (0.01 - 1e-6))
    # checkpoints every round, the final adapter in PEFT format equal to the result
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["final", "round_0001", "round_0002", "round_0003", "round_0004"]
    state, adapter_config = load_adapter(reference.adapter_dir)
    assert reference.adapter_dir == run_dir / "checkpoints" / "final"
    np.testing.assert_array_equal(reference.codec.flatten(state), reference.global_vector)
    assert adapter_config["r"] == 8 and adapter_config["base_model_name_or_path"] == (
        "tiny-random-llama")
    assert np.isfinite(reference.global_vector).all()
    assert np.abs(reference.global_vector).sum() > 0


def test_final_adapter_loads_with_peft(reference):
    from peft import PeftModel

    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state

    base, _ = load_model_and_tokenizer(config().model)
    model = PeftModel.from_pretrained(base, str(reference.adapter_dir))
    np.testing.assert_array_equal(reference.codec.flatten(adapter_state(model)),
                                  reference.global_vector)


@pytest.fixture(scope="module")
def one_worker(ray_session, tmp_path_factory):
    """The reference's config and clients on 1 worker."""
    return run_federation(config("resources.num_workers=1"), tmp_path_factory.mktemp("one"),
                          make_clients(4, malicious=(1,)))


def test_one_worker_gives_the_bitwise_same_adapter(one_worker, reference):
    np.testing.assert_array_equal(one_worker.global_vector, reference.global_vector)
    assert all(r["assignment"] == {"0": 0, "1": 0, "2": 0, "3": 0} for r in one_worker.rounds)


def test_stop_at_round_two_and_resume(ray_session, tmp_path, one_worker):
    """1 worker (cheaper; 1 and 2 workers give the same bits, tested above)."""
    cfg, clients = config("resources.num_workers=1"), make_clients(4, malicious=(1,))
    first = run_federation(cfg, tmp_path, clients, stop_after=2)
    assert not first.finished and first.rounds_completed == 2 and first.adapter_dir is None
    assert len(read_rounds(tmp_path)) == 2
    assert not (tmp_path / "checkpoints" / "final").exists()
    # a second fresh run would overwrite it; a different config may not resume it
    with pytest.raises(CheckpointError, match="resume=True"):
        run_federation(cfg, tmp_path, clients)
    with pytest.raises(CheckpointError, match="config hash"):
        run_federation(config("resources.num_workers=1", "federation.lr=0.02"), tmp_path,
                       clients, resume=True)
    resumed = run_federation(cfg, tmp_path, clients, resume=True)
    assert resumed.finished and resumed.resumed_from == 2
    np.testing.assert_array_equal(resumed.global_vector, one_worker.global_vector)
    rounds = read_rounds(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert [r["mean_loss"] for r in rounds] == [r["mean_loss"] for r in one_worker.rounds]


def test_sigkill_of_a_worker_mid_round_retries_elsewhere(ray_session, tmp_path, reference):
    driver, result_ref = start_federation(config(), tmp_path, make_clients(4, malicious=(1,)))
    killed = None
    try:
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline:
            status = ray_session.get(driver.status.remote())
            # kill worker 0 while it holds a round-2 task (it has 2 clients queued per round)
            if status["round"] == 2 and 0 in status["inflight"].values():
                killed = status["worker_pids"][0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.002)
        result = ray_session.get(result_ref, timeout=300)
    finally:
        ray_session.kill(driver)
    assert killed is not None, "the run never reached round 2"
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == "zombie"
    np.testing.assert_array_equal(result.global_vector, reference.global_vector)
    second = result.rounds[1]
    assert second["retries"] >= 1 and second["failed"] == []
    retried = [c for c in second["clients"] if c["attempt"] > 0]
    assert retried and all(c["worker"] == 1 for c in retried)


def test_nan_updates_are_rejected_and_logged(ray_session, tmp_path, reference):
    """SCAFFOLD with a corrupted (NaN) control variate for client 1: its delta is NaN each round.

    Client 3 is malicious with a sign-flip x10 update attack: the rule sees its delta scaled.
    """
    dim = reference.codec.dim
    cfg = config("federation.algorithm=scaffold", "federation.rounds=2",
                 "federation.min_quorum=3", "resources.num_workers=1",
                 "attack.update.name=sign_flip", "attack.update.params={scale: 10.0}")
    clients = make_clients(4, malicious=(3,), **{"1": np.full(dim, np.nan, np.float32)})
    result = run_federation(cfg, tmp_path, clients)
    for r in read_rounds(tmp_path):
        assert r["aggregated"] == [0, 2, 3]
        assert [x["client"] for x in r["rejected"]] == [1]
        assert "non-finite" in r["rejected"][0]["reason"]
        norms = {c["id"]: c["norm"] for c in r["clients"]}
        # AdamW moves every client about equally far; the attack multiplied client 3 by 10
        assert norms[3] > 5 * max(norms[0], norms[2])
    assert np.isfinite(result.global_vector).all()
    # accepted clients' control variates live on disk, one current file each
    files = sorted(p.name for p in (tmp_path / "client_state").iterdir())
    assert files == ["c000000_r00001.npy", "c000002_r00001.npy", "c000003_r00001.npy"]


def test_round_timeout_with_drop_policy_breaks_the_quorum(ray_session, tmp_path):
    """Every task misses a 1 ms deadline: all are dropped, and 0 < min_quorum=1 stops the run."""
    cfg = config("federation.on_client_failure=drop", "federation.round_timeout_s=0.001",
                 "federation.min_quorum=1", "resources.num_workers=1")
    with pytest.raises(ClientFailure, match=r"0 of 4 sampled clients.*min_quorum=1"):
        run_federation(cfg, tmp_path, make_clients(4))
    assert not (tmp_path / "checkpoints" / "round_0001").exists()


def test_openfedllm_compat_sampling_and_weights(ray_session, tmp_path):
    """random.seed(r); random.sample(range(6), 2) per round; weights = dataset sizes (4 + c)."""
    cfg = config("federation.compat=openfedllm", "federation.num_clients=6",
                 "federation.clients_per_round=2", "federation.rounds=3",
                 "resources.num_workers=1", "federation.server_optimizer=fedadam",
                 "federation.server_lr=0.01", "federation.checkpoint_every=3")
    result = run_federation(cfg, tmp_path, make_clients(6, per_client=lambda c: 4 + c))
    for r in range(3):
        random.seed(r)
        expected = sorted(random.sample(range(6), 2))
        record = result.rounds[r]
        assert record["sampled"] == expected
        sizes = [4 + c for c in expected]
        assert [c["input_weight"] for c in record["clients"]] == sizes
        assert [c["weight"] for c in record["clients"]] == pytest.approx(
            [s / sum(sizes) for s in sizes])
    from safetensors.numpy import load_file

    server = load_file(str(tmp_path / "checkpoints" / "round_0003" / "server_state.safetensors"))
    assert sorted(server) == ["server.m", "server.v"]
    assert (server["server.v"] > 0).all()


def _rss(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


# Peak RSS bounds for the tiny model (measured: see docs/federation.md). Each process imports torch,
# transformers and peft (~300 MB); the bound leaves room for allocator noise, not for growth with
# the 500 registered clients.
DRIVER_RSS_BOUND = 700 * 2**20
WORKER_RSS_BOUND = 1000 * 2**20


def test_500_clients_20_per_round_on_2_workers(ray_session, tmp_path):
    cfg = config("federation.num_clients=500", "federation.clients_per_round=20",
                 "federation.rounds=3", "federation.local_steps=1",
                 "federation.checkpoint_every=0")
    started = time.time()
    driver, result_ref = start_federation(cfg, tmp_path, make_clients(500, per_client=lambda c: 4,
                                                                      malicious=range(0, 500, 5)))
    peak: dict[int, int] = {}
    trainer_procs: set[int] = set()
    try:
        while not ray_session.wait([result_ref], timeout=0.2)[0]:
            status = ray_session.get(driver.status.remote())
            for pid, rss in _rss([status["pid"], *status["worker_pids"]]).items():
                peak[pid] = max(peak.get(pid, 0), rss)
            for p in psutil.Process().children(recursive=True):
                try:
                    if "TrainerWorker" in " ".join(p.cmdline()) and p.create_time() >= started:
                        trainer_procs.add(p.pid)
                except psutil.Error:
                    pass
        result = ray_session.get(result_ref)
    finally:
        ray_session.kill(driver)
    assert result.finished and len(result.rounds) == 3
    assert all(len(r["aggregated"]) == 20 for r in result.rounds)
    # no actor per client: the 2 trainer processes served all 60 client tasks
    assert len(trainer_procs) <= 2
    assert {c["worker"] for r in result.rounds for c in r["clients"]} == {0, 1}
    driver_pid, *worker_pids = [status["pid"], *status["worker_pids"]]
    assert peak[driver_pid] < DRIVER_RSS_BOUND, peak
    assert all(peak[p] < WORKER_RSS_BOUND for p in worker_pids), peak
    print(f"peak RSS MB: driver {peak[driver_pid] / 2**20:.0f}, workers "
          f"{[round(peak[p] / 2**20) for p in worker_pids]}")

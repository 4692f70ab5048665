"""Federation maths without Ray: sampling, seeds, the lr schedule, server optimizers, validation."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import numpy as np
import pytest

from ray_fedit.federation.sampling import (
    assign_workers,
    derive_seed,
    openfedllm_subsample,
    round_half_up,
    sample_clients,
)
from ray_fedit.federation.server_opt import ServerOptConfig, ServerOptState, init_state, server_step
from ray_fedit.federation.sft import cosine_learning_rate
from ray_fedit.federation.state import ClientUpdate
from ray_fedit.federation.updates import aggregation_weights, client_metrics, validate_update


# ----------------------------------------------------------------------------------- lr schedule
def test_cosine_learning_rate_hand_values():
    """lr_min + 0.5 (lr - lr_min)(1 + cos(pi r / R)): r=0 -> lr; r=R/2 -> midpoint; r=R -> lr_min.

    Paper: lr=5e-5, lr_min=1e-6, R=100; r=50 -> 1e-6 + 0.5 * 4.9e-5 = 2.55e-5.
    """
    assert cosine_learning_rate(0, 100, 5e-5, 1e-6) == pytest.approx(5e-5, rel=1e-12)
    assert cosine_learning_rate(50, 100, 5e-5, 1e-6) == pytest.approx(2.55e-5, rel=1e-12)
    assert cosine_learning_rate(100, 100, 5e-5, 1e-6) == pytest.approx(1e-6, rel=1e-12)
    # r=1 of 3: cos(pi/3) = 0.5 -> 0 + 0.5 * 1.0 * 1.5 = 0.75
    assert cosine_learning_rate(1, 3, 1.0, 0.0) == pytest.approx(0.75, rel=1e-12)


# -------------------------------------------------------------------------------------- sampling
def test_openfedllm_sampling_matches_the_paper_code():
    """compat: random.seed(r); random.sample(range(n), k), for every round."""
    for r in range(20):
        random.seed(r)
        expected = sorted(random.sample(range(10), 3))
        got = sample_clients(seed=123, round_index=r, num_clients=10, clients_per_round=3,
                             mode="openfedllm")
        assert got == expected


def test_openfedllm_subsample_matches_the_paper_code():
    """get_dataset_this_round: random.seed(round); random.sample(range(len), min(needed, len))."""
    random.seed(7)
    assert openfedllm_subsample(500, 160, 7) == random.sample(range(500), 160)
    assert sorted(openfedllm_subsample(5, 160, 7)) == [0, 1, 2, 3, 4]


def test_uniform_sampling_is_seeded_distinct_and_varies_by_round():
    draws = [sample_clients(seed=0, round_index=r, num_clients=50, clients_per_round=5,
                            mode="uniform") for r in range(10)]
    for d in draws:
        assert d == sorted(set(d)) and len(d) == 5 and all(0 <= c < 50 for c in d)
    assert draws[0] == sample_clients(seed=0, round_index=0, num_clients=50, clients_per_round=5,
                                      mode="uniform")
    assert len({tuple(d) for d in draws}) > 1
    assert draws[0] != sample_clients(seed=1, round_index=0, num_clients=50, clients_per_round=5,
                                      mode="uniform")


def test_all_clients_when_clients_per_round_covers_them():
    assert sample_clients(seed=0, round_index=3, num_clients=4, clients_per_round=4,
                          mode="uniform") == [0, 1, 2, 3]


def test_stratified_sampling_keeps_the_malicious_share():
    """10 clients, 3 malicious (share 0.3), 3 per round: round_half_up(0.9) = 1 malicious/round."""
    malicious = [2, 5, 7]
    for r in range(30):
        got = sample_clients(seed=4, round_index=r, num_clients=10, clients_per_round=3,
                             mode="stratified", malicious_ids=malicious)
        assert len(got) == 3 and len(set(got)) == 3
        assert sum(c in malicious for c in got) == 1
    # 5 per round: round_half_up(1.5) = 2
    got = sample_clients(seed=4, round_index=0, num_clients=10, clients_per_round=5,
                         mode="stratified", malicious_ids=malicious)
    assert sum(c in malicious for c in got) == 2
    assert round_half_up(2.5) == 3 and round_half_up(0.49) == 0


def test_derived_seeds_depend_on_every_coordinate():
    base = derive_seed(0, 1, 2, "batches")
    assert base == derive_seed(0, 1, 2, "batches")
    others = {derive_seed(1, 1, 2, "batches"), derive_seed(0, 2, 2, "batches"),
              derive_seed(0, 1, 3, "batches"), derive_seed(0, 1, 2, "dropout"),
              derive_seed(0, 1, -1, "batches")}
    assert base not in others and len(others) == 5
    assert 0 <= base < 2**63


def test_derived_seeds_are_stable_across_processes():
    """hashlib, not the salted str hash: a worker process derives the same seed."""
    code = ("from ray_fedit.federation.sampling import derive_seed; "
            "print(derive_seed(3, 4, 5, 'dropout'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "99", "PATH": ""})
    assert int(out.stdout) == derive_seed(3, 4, 5, "dropout")


def test_assign_workers_prefers_affinity_and_balances():
    # as many workers as clients: each client pinned to worker client_id % 4
    assert assign_workers([0, 1, 2, 3], 4) == {0: 0, 1: 1, 2: 2, 3: 3}
    # 4 even ids on 2 workers: cap 2 each, the overflow goes to worker 1
    got = assign_workers([0, 2, 4, 6], 2)
    assert got == {0: 0, 2: 0, 4: 1, 6: 1}
    got = assign_workers(list(range(0, 40, 2)) + [1], 2)
    loads = np.bincount(list(got.values()), minlength=2)
    assert loads.max() - loads.min() <= 1


# ------------------------------------------------------------------------------ server optimizers
def test_fedavg_server_step_is_scaled_delta():
    cfg = ServerOptConfig(name="none", lr=0.5)
    x, _ = server_step(cfg, init_state(cfg, 2), np.array([1.0, 2.0], np.float32),
                       np.array([2.0, -4.0], np.float32))
    np.testing.assert_allclose(x, [2.0, 0.0])


def test_fedavgm_two_steps():
    """m1 = d1 = [1,-2]; x1 = [1,-2]. m2 = 0.9*[1,-2] + [1,0] = [1.9,-1.8]; x2 = [2.9,-3.8]."""
    cfg = ServerOptConfig(name="fedavgm", lr=1.0, momentum=0.9)
    state = init_state(cfg, 2)
    x = np.zeros(2, np.float32)
    x, state = server_step(cfg, state, x, np.array([1.0, -2.0], np.float32))
    np.testing.assert_allclose(x, [1.0, -2.0])
    x, state = server_step(cfg, state, x, np.array([1.0, 0.0], np.float32))
    np.testing.assert_allclose(state.arrays["m"], [1.9, -1.8], rtol=1e-6)
    np.testing.assert_allclose(x, [2.9, -3.8], rtol=1e-6)
    assert state.steps == 2


def test_fedadagrad_one_step():
    """tau=3 -> v0=9; d=[4,0,-4]; v = 9 + d^2 = [25,9,25]; b1=0.5 -> m = [2,0,-2];
    x += m / (sqrt(v) + 3) = [2/8, 0, -2/8]."""
    cfg = ServerOptConfig(name="fedadagrad", lr=1.0, beta1=0.5, tau=3.0)
    state = init_state(cfg, 3)
    np.testing.assert_allclose(state.arrays["v"], [9.0, 9.0, 9.0])
    x, new = server_step(cfg, state, np.array([1.0, 2.0, 3.0], np.float32),
                         np.array([4.0, 0.0, -4.0], np.float32))
    np.testing.assert_allclose(new.arrays["v"], [25.0, 9.0, 25.0])
    np.testing.assert_allclose(new.arrays["m"], [2.0, 0.0, -2.0])
    np.testing.assert_allclose(x, [1.25, 2.0, 2.75], rtol=1e-6)
    np.testing.assert_allclose(state.arrays["v"], [9.0, 9.0, 9.0])  # input state untouched


def test_fedadam_one_step():
    """tau=1 -> v0=1; b2=0.5; d=[7,1,-7]: v = 0.5 + 0.5 d^2 = [25,1,25]; b1=0.5 -> m=[3.5,.5,-3.5];
    x += 2 * m / (sqrt(v) + 1) = 2 * [3.5/6, 0.5/2, -3.5/6]."""
    cfg = ServerOptConfig(name="fedadam", lr=2.0, beta1=0.5, beta2=0.5, tau=1.0)
    x, new = server_step(cfg, init_state(cfg, 3), np.zeros(3, np.float32),
                         np.array([7.0, 1.0, -7.0], np.float32))
    np.testing.assert_allclose(new.arrays["v"], [25.0, 1.0, 25.0])
    np.testing.assert_allclose(x, [7.0 / 6, 0.5, -7.0 / 6], rtol=1e-6)


def test_fedyogi_one_step_uses_the_sign_rule():
    """v=[9,25], d=[4,2], b2=0.5: v-d^2 = [-7, 21] -> v = [9 + 8, 25 - 2] = [17, 23] (Adam would
    give [12.5, 14.5]); b1=0.5 -> m=[2,1]; x += m / (sqrt(v) + 1)."""
    cfg = ServerOptConfig(name="fedyogi", lr=1.0, beta1=0.5, beta2=0.5, tau=1.0)
    state = ServerOptState(arrays={"m": np.zeros(2, np.float32),
                                   "v": np.array([9.0, 25.0], np.float32)}, steps=3)
    x, new = server_step(cfg, state, np.zeros(2, np.float32), np.array([4.0, 2.0], np.float32))
    np.testing.assert_allclose(new.arrays["v"], [17.0, 23.0])
    np.testing.assert_allclose(x, [2 / (math.sqrt(17) + 1), 1 / (math.sqrt(23) + 1)], rtol=1e-6)
    assert new.steps == 4 and x.dtype == np.float32


# ------------------------------------------------------------------------------------ validation
def _update(delta, n=8, state=None):
    return ClientUpdate(np.asarray(delta, dtype=np.float32), n, {"shard_size": 10}, state)


@pytest.mark.parametrize("delta, reason", [
    ([0.0, float("nan"), 1.0], "non-finite"),
    ([0.0, float("inf"), 1.0], "non-finite"),
    ([0.0, 1.0], "shape"),
])
def test_validate_rejects_bad_deltas(delta, reason):
    got = validate_update(1, _update(delta), dim=3, sampled=[1, 2], num_clients=4)
    assert got is not None and reason in got


def test_validate_rejects_unknown_unsampled_and_malformed():
    good = _update([0.0, 1.0, 2.0])
    assert validate_update(1, good, dim=3, sampled=[1, 2], num_clients=4) is None
    assert "unknown" in validate_update(9, good, dim=3, sampled=[1, 2], num_clients=4)
    assert "not sampled" in validate_update(3, good, dim=3, sampled=[1, 2], num_clients=4)
    wrong_dtype = ClientUpdate(np.zeros(3, np.float64), 8, {}, None)
    assert "dtype" in validate_update(1, wrong_dtype, dim=3, sampled=[1], num_clients=4)
    assert "malformed" in validate_update(1, (np.zeros(3, np.float32), 8, {}), dim=3, sampled=[1],
                                          num_clients=4)
    assert "n_examples" in validate_update(1, _update([0, 0, 0], n=0), dim=3, sampled=[1],
                                           num_clients=4)


def test_validate_checks_scaffold_state():
    nan_state = np.array([0.0, np.nan, 0.0], np.float32)
    got = validate_update(1, _update([0, 0, 0], state=nan_state), dim=3, sampled=[1],
                          num_clients=4, needs_state=True)
    assert got is not None and got.startswith("state")
    got = validate_update(1, _update([0, 0, 0]), dim=3, sampled=[1], num_clients=4,
                          needs_state=True)
    assert got is not None and "state" in got


def test_weights_and_client_metrics():
    ups = [ClientUpdate(np.zeros(2, np.float32), 8, {"shard_size": 500}),
           ClientUpdate(np.zeros(2, np.float32), 8, {"shard_size": 300})]
    np.testing.assert_array_equal(aggregation_weights(ups, "openfedllm"), [500, 300])
    np.testing.assert_array_equal(aggregation_weights(ups, "uniform"), [8, 8])
    # deltas [3,4] (norm 5, cos 0.6 to [1,0]), [0,0] (norm 0, cos defined as 0), [-2,0] (cos -1)
    norms, cos = client_metrics(np.array([[3, 4], [0, 0], [-2, 0]], np.float32),
                                np.array([1, 0], np.float32))
    np.testing.assert_allclose(norms, [5, 0, 2])
    np.testing.assert_allclose(cos, [0.6, 0.0, -1.0])


def test_pure_modules_import_without_ray():
    """sft, sampling, server_opt, updates, state, checkpoint: no Ray import (L9)."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import ray_fedit.federation as f\n"
            "import ray_fedit.federation.sft, ray_fedit.federation.sampling\n"
            "import ray_fedit.federation.server_opt, ray_fedit.federation.updates\n"
            "import ray_fedit.federation.checkpoint, ray_fedit.federation.state\n"
            "print(f.ClientSpec.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ClientSpec"


@pytest.mark.parametrize("optimizer,lr", [("none", 1.0), ("fedavgm", 1.0), ("fedadagrad", 1e-3),
                                          ("fedadam", 1e-3), ("fedyogi", 1e-3)])
def test_server_lr_defaults_per_optimizer(optimizer, lr):
    """An adaptive step of size 1.0 would be ~1/tau = 1000x a FedAvg step: OpenFedLLM's 1e-3."""
    from ray_fedit.config import load_config

    cfg = load_config(None, [f"federation.server_optimizer={optimizer}"])
    assert cfg.federation.server_lr is None and cfg.federation.resolved_server_lr == lr
    explicit = load_config(None, [f"federation.server_optimizer={optimizer}",
                                  "federation.server_lr=0.5"])
    assert explicit.federation.resolved_server_lr == 0.5

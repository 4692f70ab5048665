"""Where the federation's components meet: stateful rules across rounds and resumes, update
attacks under uniform sampling, and the paired no-attack federation's sampling."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from ray_fedit.federation import run_federation
from ray_fedit.federation.sampling import sample_clients
from tests.ray.test_federation import config, make_clients, read_rounds

ONE = ("resources.num_workers=1", "federation.rounds=3", "federation.checkpoint_every=1",
       "federation.local_steps=1")


@pytest.mark.parametrize("rule", [
    ("aggregator.name=centered_clipping", "aggregator.params={tau: 0.001}"),
    ("aggregator.name=foolsgold",),
])
def test_stateful_rules_keep_their_state_and_resume_bitwise(ray_session, tmp_path, rule):
    """3 rounds straight vs 1 round, stop, resume: the same bits, so the center / history was in
    the checkpoint (a resume from zeros would differ)."""
    cfg, clients = config(*ONE, *rule), make_clients(4, malicious=(1,))
    full = run_federation(cfg, tmp_path / "full", clients)
    run_federation(cfg, tmp_path / "cut", clients, stop_after=1)
    arrays = load_file(str(tmp_path / "cut" / "checkpoints" / "round_0001" /
                           "server_state.safetensors"))
    kept = sorted(k for k in arrays if k.startswith("rule."))
    if "centered_clipping" in rule[0]:
        # round 1 clips every client to tau around 0: the center is a step of norm <= tau
        assert kept == ["rule.center"]
        assert 0 < np.linalg.norm(arrays["rule.center"]) <= 0.001 * (1 + 1e-5)
    else:
        assert kept == [f"rule.history.{c}" for c in (0, 1, 2, 3)]
    resumed = run_federation(cfg, tmp_path / "cut", clients, resume=True)
    assert resumed.resumed_from == 1
    np.testing.assert_array_equal(resumed.global_vector, full.global_vector)


def test_alie_under_uniform_sampling_sends_trained_updates_when_references_are_short(
        ray_session, tmp_path):
    """6 clients, 1 and 4 malicious, 3 per round, uniform, seed 1: rounds 1-2 sample one attacker
    and two benign clients (ALIE runs), round 3 two attackers and one benign client (ALIE needs 2
    references: the attackers send their trained updates, and the run goes on)."""
    cfg = config("resources.num_workers=1", "federation.rounds=3", "seed=1",
                 "federation.num_clients=6", "federation.clients_per_round=3",
                 "federation.sampling=uniform", "attack.update.name=alie",
                 "federation.checkpoint_every=3")
    counts = [sum(c in (1, 4) for c in sample_clients(
        seed=1, round_index=r, num_clients=6, clients_per_round=3, mode="uniform",
        malicious_ids=[1, 4])) for r in range(3)]
    assert counts == [1, 1, 2]
    result = run_federation(cfg, tmp_path, make_clients(6, malicious=(1, 4)))
    assert result.finished
    notes = [r["update_attack"] for r in read_rounds(tmp_path)]
    assert [n["applied"] for n in notes] == [True, True, False]
    assert "needs at least 2 reference updates" in notes[2]["reason"]


def test_the_paired_no_attack_federation_samples_the_same_clients(ray_session, tmp_path):
    """Stratified sampling keys off the malicious ids; the no-attack federation (no malicious
    clients) given the attacked run's ids as sampling strata draws the same clients each round."""
    cfg = config("resources.num_workers=1", "federation.rounds=3", "federation.num_clients=6",
                 "federation.clients_per_round=3", "federation.sampling=stratified",
                 "federation.checkpoint_every=3", "federation.local_steps=1")
    attacked = run_federation(cfg, tmp_path / "attacked", make_clients(6, malicious=(1, 4)))
    clean = run_federation(cfg, tmp_path / "clean", make_clients(6), sampling_strata=[1, 4])
    assert [r["sampled"] for r in clean.rounds] == [r["sampled"] for r in attacked.rounds]
    assert all(not c["malicious"] for r in clean.rounds for c in r["clients"])


def test_the_driver_places_the_rule_by_the_aggregator_section(ray_session, tmp_path):
    """aggregator.num_shards reaches the driver: residual on 2 coordinate shards (Ray tasks on the
    CPU the one worker leaves free) gives the in-process run's adapter bitwise, and every round's
    record says how many shards ran."""
    rule = ("aggregator.name=residual", "aggregator.params={shard_size: 256}")
    clients = make_clients(4, malicious=(1,))
    local = run_federation(config(*ONE, *rule), tmp_path / "local", clients)
    shards = run_federation(config(*ONE, *rule, "aggregator.num_shards=2"), tmp_path / "shards",
                            clients)
    np.testing.assert_array_equal(shards.global_vector, local.global_vector)
    assert all("shards" not in r["aggregator_info"] for r in read_rounds(tmp_path / "local"))
    assert [r["aggregator_info"]["shards"] for r in read_rounds(tmp_path / "shards")] == [2, 2, 2]

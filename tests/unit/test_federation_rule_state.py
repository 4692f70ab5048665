"""The state stateful rules keep across rounds: passed each round, advanced, checkpointed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_fedit.aggregators import aggregate
from ray_fedit.federation.rule_state import RuleState, advance, round_state
from ray_fedit.federation.updates import scaffold_control


def run_round(rule, state, ids, updates, rnd=0, seed=0, **params):
    u = torch.tensor(updates, dtype=torch.float32)
    kw = round_state(rule, state, client_ids=ids, dim=u.shape[1], seed=seed, round_index=rnd)
    res = aggregate(rule, u, torch.ones(len(ids)), state=kw, **params)
    advance(rule, state, client_ids=ids, updates=u, aggregate=res.aggregate)
    return res


def test_centered_clipping_clips_around_the_previous_aggregate():
    """tau 1. Round 1 starts at 0: updates (0.5, 0), (0.5, 0) are inside the ball, aggregate
    (0.5, 0). Round 2: updates (3.5, 0) and (0.5, 0) around the center (0.5, 0): differences 3 and
    0, the first clipped to 1 -> center + mean((1, 0), (0, 0)) = (1.0, 0). From zeros (the old
    behaviour, norm clipping) it would be mean((1, 0), (0.5, 0)) = (0.75, 0)."""
    state = RuleState()
    r1 = run_round("centered_clipping", state, [0, 1], [[0.5, 0.0], [0.5, 0.0]], tau=1.0)
    assert r1.aggregate.tolist() == [0.5, 0.0]
    assert state.center.tolist() == [0.5, 0.0]
    r2 = run_round("centered_clipping", state, [0, 2], [[3.5, 0.0], [0.5, 0.0]], rnd=1, tau=1.0)
    assert r2.aggregate.tolist() == pytest.approx([1.0, 0.0])
    plain = aggregate("norm_clip", torch.tensor([[3.5, 0.0], [0.5, 0.0]]), torch.ones(2),
                      max_norm=1.0)
    assert plain.aggregate.tolist() == pytest.approx([0.75, 0.0])


def test_foolsgold_compares_accumulated_histories():
    """Round 1: clients 0 and 1 send (1, 0) and (0, 1) (orthogonal, both trusted). Round 2: both
    send (1, 0). Per round they are identical sybils (cos 1: all weights 0, zero update); with
    history they are (2, 0) and (1, 1), cos 0.71: both keep the same positive weight."""
    state = RuleState()
    run_round("foolsgold", state, [0, 1], [[1.0, 0.0], [0.0, 1.0]])
    assert state.history[0].tolist() == [1.0, 0.0] and state.history[1].tolist() == [0.0, 1.0]
    with_history = run_round("foolsgold", state, [0, 1], [[1.0, 0.0], [1.0, 0.0]], rnd=1)
    assert not with_history.info["all_sybil"]
    assert with_history.client_weights[0] == with_history.client_weights[1] > 0
    stateless = aggregate("foolsgold_stateless", torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                          torch.ones(2))
    assert stateless.info["all_sybil"] and "zero update" in stateless.info["fallback"]
    assert state.history[0].tolist() == [2.0, 0.0]


def test_foolsgold_history_rows_follow_the_aggregated_clients():
    state = RuleState(history={3: np.array([1.0, 2.0], np.float32)})
    kw = round_state("foolsgold", state, client_ids=[1, 3], dim=2, seed=0, round_index=4)
    assert kw["history"].tolist() == [[0.0, 0.0], [1.0, 2.0]]


def test_dnc_samples_other_coordinates_each_round_and_each_seed():
    """The generator comes from (seed, round): two rounds and two seeds draw different subsets."""
    def cols(seed, rnd):
        g = round_state("dnc", RuleState(), client_ids=[0, 1], dim=1000, seed=seed,
                        round_index=rnd)["generator"]
        return torch.randperm(1000, generator=g)[:10].sort().values.tolist()

    assert cols(0, 0) == cols(0, 0)
    assert cols(0, 0) != cols(0, 1)
    assert cols(0, 0) != cols(1, 0)


def test_stateless_rules_get_no_state():
    assert round_state("median", RuleState(), client_ids=[0], dim=3, seed=0, round_index=0) == {}


def test_rule_state_round_trips_through_named_arrays():
    state = RuleState(center=np.array([0.25, -1.0], np.float32),
                      history={2: np.array([1.0, 3.0], np.float32), 11: np.zeros(2, np.float32)})
    arrays = state.to_arrays()
    assert sorted(arrays) == ["rule.center", "rule.history.11", "rule.history.2"]
    back = RuleState.from_arrays({**arrays, "server.m": np.ones(2, np.float32)})
    assert back.center.tobytes() == state.center.tobytes()
    assert {c: h.tobytes() for c, h in back.history.items()} == \
        {c: h.tobytes() for c, h in state.history.items()}
    assert RuleState.from_arrays({}).center is None


def test_scaffold_control_uses_the_rules_client_weights():
    """Krum trusts client 1 alone (weights (0, 1, 0)): the malicious client 2's control delta
    (100, 100) must not reach the server control. c = 0 + (3/10) * (1, 2) = (0.3, 0.6)."""
    deltas = [np.array([4.0, 4.0], np.float32), np.array([1.0, 2.0], np.float32),
              np.array([100.0, 100.0], np.float32)]
    c = scaffold_control(np.zeros(2, np.float32), deltas, np.array([0.0, 1.0, 0.0]),
                         sampled_share=0.3)
    assert c.tolist() == pytest.approx([0.3, 0.6])
    mean = scaffold_control(np.zeros(2, np.float32), deltas, np.ones(3) / 3, sampled_share=0.3)
    assert mean.tolist() == pytest.approx([0.3 * 105 / 3, 0.3 * 106 / 3])
    unchanged = scaffold_control(np.ones(2, np.float32), deltas, np.zeros(3), sampled_share=0.3)
    assert unchanged.tolist() == [1.0, 1.0]


def test_scaffold_control_under_krum_ignores_a_malicious_control_variate():
    """Through the real rule: n=5, f=1, client 4 is far away; Krum picks a central client and the
    server control moves by that client's control delta alone."""
    u = torch.tensor([[0.0], [1.0], [2.0], [4.0], [100.0]])
    res = aggregate("krum", u, torch.ones(5), f=1)
    deltas = [np.array([float(i)], np.float32) for i in range(4)] + [np.array([1e6], np.float32)]
    c = scaffold_control(np.zeros(1, np.float32), deltas, res.client_weights.numpy(),
                         sampled_share=1.0)
    assert c.tolist() == [1.0]

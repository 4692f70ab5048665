"""The contract every registered aggregation rule meets (STYLE.md L12).

Registering a rule adds it to this battery automatically; the battery fails until the rule has a
row in ``BATTERY_PARAMS``. Properties a rule breaks by design are declared next to its registration
as metadata:

* ``exempt``: names of the checks below that do not apply (with the reason in a comment there);
* ``robust``: whether the rule must land near a clustered honest majority despite a far minority
  (``mean`` declares False, and the battery checks that it does *not*);
* ``ignores_weights``: whether the output must be independent of the client sizes;
* ``reduces_to_mean``: parameters under which the rule is the mean (weighted unless it ignores
  weights), e.g. ``{"f": 0}``; ``None`` when no setting does.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from ray_fedit.aggregators import AGGREGATORS, AggregationResult, check_params

N, D, F = 11, 6, 2  # 11 clients so that Bulyan's n >= 4f+3 holds with f = 2

# Default parameters of each rule for the battery: attacker count F where the rule takes one.
BATTERY_PARAMS: dict[str, dict] = {
    "mean": {},
    "median": {},
    "trimmed_mean": {"trim": F},
    "krum": {"f": F},
    "multi_krum": {"f": F},
    "bulyan": {"f": F},
    "dnc": {"f": F},
    "foolsgold": {},
    "foolsgold_stateless": {},
    "residual": {},
    "norm_clip": {"max_norm": 2.5},
    "geometric_median": {},
    "centered_clipping": {"tau": 1.0, "iters": 20},
}
CHECKS = {"shape", "permutation", "fixed_point", "finite", "outlier_minority", "reduces_to_mean"}
META_KEYS = {"robust", "ignores_weights", "reduces_to_mean"}

RULES = AGGREGATORS.names()


def run(name: str, updates: torch.Tensor, weights: torch.Tensor, **override) -> AggregationResult:
    params = {**BATTERY_PARAMS[name], **override}
    check_params(name, updates.shape[0], params)
    return AGGREGATORS.get(name)(updates, weights, **params)


@pytest.mark.parametrize("name", RULES)
def test_declared_state_is_made_of_keyword_parameters(name):
    """What a rule declares as federation state must be keyword parameters with a default."""
    params = inspect.signature(AGGREGATORS.get(name)).parameters
    for key in AGGREGATORS.meta(name).get("state", ()):
        assert params[key].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[key].default is None


def applies(name: str, check: str) -> bool:
    return check not in AGGREGATORS.meta(name).get("exempt", ())


def random_round(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    updates = torch.randn(N, D, generator=gen)
    weights = torch.randint(1, 20, (N,), generator=gen).float()
    return updates, weights


def test_every_rule_has_battery_params_and_declared_metadata():
    assert set(BATTERY_PARAMS) == set(RULES), "add a BATTERY_PARAMS row for each new rule"
    for name in RULES:
        meta = AGGREGATORS.meta(name)
        assert META_KEYS <= set(meta), f"{name} must declare {sorted(META_KEYS - set(meta))}"
        assert set(meta.get("exempt", ())) <= CHECKS, f"{name} exempts an unknown check"


@pytest.mark.parametrize("name", RULES)
def test_output_shapes_and_dtypes(name):
    updates, weights = random_round(0)
    res = run(name, updates, weights)
    assert isinstance(res, AggregationResult)
    assert res.aggregate.shape == (D,) and res.aggregate.dtype == torch.float32
    assert res.client_weights.shape == (N,) and res.client_weights.dtype == torch.float32
    assert bool((res.client_weights >= -1e-7).all())
    assert float(res.client_weights.sum()) <= 1.0 + 1e-5
    json.dumps(res.info, allow_nan=False)  # the runner logs info to rounds.jsonl


@pytest.mark.parametrize("shape", [(N, D), (N, 1), (3, D)])
@pytest.mark.parametrize("name", RULES)
def test_inputs_are_not_modified(name, shape):
    """Including the degenerate shapes where a transposed view already counts as contiguous."""
    updates = torch.randn(*shape, generator=torch.Generator().manual_seed(8))
    weights = torch.arange(1.0, shape[0] + 1)
    before = (updates.clone(), weights.clone())
    params = dict(BATTERY_PARAMS[name])
    if shape[0] < N:  # 3 clients: no attacker budget
        params = {k: (0 if k in ("f", "trim") else v) for k, v in params.items()}
    AGGREGATORS.get(name)(updates, weights, **params)
    assert torch.equal(updates, before[0]) and torch.equal(weights, before[1])


@pytest.mark.parametrize("name", [r for r in RULES if applies(r, "permutation")])
def test_permuting_clients_permutes_client_weights_only(name):
    updates, weights = random_round(1)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(7))
    base = run(name, updates, weights)
    moved = run(name, updates[perm], weights[perm])
    torch.testing.assert_close(moved.aggregate, base.aggregate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        moved.client_weights, base.client_weights[perm], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", [r for r in RULES if applies(r, "fixed_point")])
def test_identical_updates_are_a_fixed_point(name):
    v = torch.tensor([0.7, -1.3, 0.2, 1.0, -0.4, 0.9])  # norm 2.05 < norm_clip's 2.5
    updates = v.expand(N, D).clone()
    res = run(name, updates, torch.arange(1.0, N + 1))
    torch.testing.assert_close(res.aggregate, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
@pytest.mark.parametrize("name", [r for r in RULES if applies(r, "finite")])
def test_finite_input_gives_finite_output(name, scale):
    updates, weights = random_round(2)
    params = {"max_norm": 2.5 * scale} if name == "norm_clip" else {}
    params |= {"tau": scale} if name == "centered_clipping" else {}
    res = run(name, updates * scale, weights, **params)
    assert bool(torch.isfinite(res.aggregate).all())
    assert bool(torch.isfinite(res.client_weights).all())


@pytest.mark.parametrize(
    "name", [r for r in RULES if AGGREGATORS.meta(r)["reduces_to_mean"] is not None]
)
def test_reduces_to_the_mean_where_theory_says_so(name):
    """E.g. f=0 for Multi-Krum, DnC and Bulyan, trim=0, max_norm=inf, tau=inf.

    Rules that use client sizes must give the *weighted* mean (sizes are non-uniform here);
    rules that ignore sizes give the plain mean.
    """
    meta = AGGREGATORS.meta(name)
    updates, weights = random_round(3)
    if meta["ignores_weights"]:
        expected = updates.mean(dim=0)
    else:
        expected = (weights / weights.sum()) @ updates
    res = run(name, updates, weights, **meta["reduces_to_mean"])
    torch.testing.assert_close(res.aggregate, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [r for r in RULES if AGGREGATORS.meta(r)["ignores_weights"]])
def test_rules_that_ignore_sizes_do_ignore_them(name):
    updates, weights = random_round(4)
    a = run(name, updates, weights)
    b = run(name, updates, torch.ones(N))
    assert torch.equal(a.aggregate, b.aggregate)


@pytest.mark.parametrize("name", [r for r in RULES if applies(r, "outlier_minority")])
def test_far_minority_moves_only_non_robust_rules(name):
    """9 honest clients near (1, ..., 1) (noise 0.1), F = 2 attackers ~150 away in one direction.

    A robust rule stays within 1.0 of the honest mean; the plain mean moves by about 25.
    """
    gen = torch.Generator().manual_seed(5)
    honest = 1.0 + 0.1 * torch.randn(N - F, D, generator=gen)
    attackers = torch.tensor(
        [[-50.0, 80.0, -30.0, 60.0, -70.0, 40.0], [-60.0, 70.0, -40.0, 50.0, -60.0, 50.0]]
    )
    updates = torch.cat([honest, attackers])
    res = run(name, updates, torch.ones(N))
    gap = float(torch.linalg.vector_norm(res.aggregate - honest.mean(dim=0)))
    if AGGREGATORS.meta(name)["robust"]:
        assert gap < 1.0, f"{name} moved {gap:.2f} away from the honest mean"
    else:
        assert gap > 10.0, f"{name} was expected to be dragged away, moved only {gap:.2f}"

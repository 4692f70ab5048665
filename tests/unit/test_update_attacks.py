"""Update-space attacks: the shared contract plus hand-computed cases.

Contract (every attack registered with ``kind="update"``): output shape and dtype, benign rows
bitwise untouched, the input never modified, a new tensor returned, and determinism for a fixed
generator seed.
"""

from __future__ import annotations

import math

import pytest
import torch

from ray_fedit.attacks import apply_update_attack, check_update_attack_params
from ray_fedit.attacks.update.alie import alie_z
from ray_fedit.errors import ConfigError
from ray_fedit.registry import ATTACKS, RegistryError

# Default parameters of each update attack for the contract battery.
ATTACK_PARAMS: dict[str, dict] = {
    "scaling": {"factor": 5.0},
    "sign_flip": {"scale": 2.0},
    "gaussian_noise": {"sigma": 0.3, "mode": "add"},
    "alie": {},
    "ipm": {"epsilon": 0.5},
    "min_max": {"perturbation": "std"},
    "min_sum": {"perturbation": "unit_vec"},
}
UPDATE_ATTACKS = [n for n in ATTACKS.names() if ATTACKS.meta(n).get("kind") == "update"]

# 3 benign clients (rows 0-2) and 2 attackers (rows 3-4).
DELTAS = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [100.0, 100.0], [-7.0, 3.0]])
MASK = torch.tensor([False, False, False, True, True])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_round() -> tuple[torch.Tensor, torch.Tensor]:
    deltas = torch.randn(7, 33, generator=gen(11))
    mask = torch.tensor([False, True, False, False, True, False, True])
    return deltas, mask


def test_every_update_attack_has_battery_params():
    assert set(ATTACK_PARAMS) == set(UPDATE_ATTACKS)


@pytest.mark.parametrize("name", UPDATE_ATTACKS)
def test_contract_shape_benign_rows_and_no_mutation(name):
    deltas, mask = random_round()
    before = deltas.clone()
    out = apply_update_attack(name, deltas, mask, gen(), **ATTACK_PARAMS[name])
    assert out.shape == deltas.shape and out.dtype == deltas.dtype
    assert torch.equal(out[~mask], deltas[~mask])  # bitwise
    assert not torch.equal(out[mask], deltas[mask])  # the attack did something
    assert torch.equal(deltas, before)  # input untouched
    assert out.data_ptr() != deltas.data_ptr()


@pytest.mark.parametrize("name", UPDATE_ATTACKS)
def test_contract_deterministic_for_a_seed(name):
    deltas, mask = random_round()
    a = apply_update_attack(name, deltas, mask, gen(3), **ATTACK_PARAMS[name])
    b = apply_update_attack(name, deltas, mask, gen(3), **ATTACK_PARAMS[name])
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", UPDATE_ATTACKS)
def test_round_without_attackers_is_unchanged(name):
    deltas, _ = random_round()
    out = apply_update_attack(
        name, deltas, torch.zeros(7, dtype=torch.bool), gen(), **ATTACK_PARAMS[name]
    )
    assert torch.equal(out, deltas) and out.data_ptr() != deltas.data_ptr()


def test_scaling_multiplies_attackers():
    """factor 3: (100, 100) -> (300, 300); (-7, 3) -> (-21, 9)."""
    out = apply_update_attack("scaling", DELTAS, MASK, gen(), factor=3.0)
    assert out[3:].tolist() == [[300.0, 300.0], [-21.0, 9.0]]


def test_sign_flip_negates_and_scales_attackers():
    """scale 2: (100, 100) -> (-200, -200); (-7, 3) -> (14, -6)."""
    out = apply_update_attack("sign_flip", DELTAS, MASK, gen(), scale=2.0)
    assert out[3:].tolist() == [[-200.0, -200.0], [14.0, -6.0]]


def test_alie_with_given_z():
    """Benign rows (1,2), (3,4), (5,6): mean (3, 4); unbiased std sqrt((4+0+4)/2) = 2 per column.
    z = 0.5 -> every attacker sends (3 + 0.5*2, 4 + 0.5*2) = (4, 5)."""
    out = apply_update_attack("alie", DELTAS, MASK, gen(), z=0.5)
    assert out[3:].tolist() == [[4.0, 5.0], [4.0, 5.0]]


def test_alie_default_z_follows_the_paper():
    """n=5, f=2: s = floor(5/2 + 1) - 2 = 1, z = Phi^-1((5-1)/5) = Phi^-1(0.8) = 0.8416.
    Attackers send (3 + 2*0.8416, 4 + 2*0.8416) = (4.6832, 5.6832). Also n=5, f=1 -> 0.2533."""
    assert alie_z(5, 2) == pytest.approx(0.841621, abs=1e-6)
    assert alie_z(5, 1) == pytest.approx(0.253347, abs=1e-6)
    out = apply_update_attack("alie", DELTAS, MASK, gen())
    torch.testing.assert_close(out[3], torch.tensor([4.683242, 5.683242]))


def test_alie_needs_a_spread():
    """knowledge='malicious' with a single attacker has no standard deviation."""
    one = torch.tensor([False, False, False, True, False])
    with pytest.raises(ConfigError, match="at least 2 reference updates"):
        apply_update_attack("alie", DELTAS, one, gen(), knowledge="malicious")
    with pytest.raises(ConfigError, match="not finite"):
        alie_z(3, 3)


def test_ipm_sends_the_negated_scaled_honest_mean():
    """Honest mean (3, 4), epsilon 0.5 -> (-1.5, -2)."""
    out = apply_update_attack("ipm", DELTAS, MASK, gen(), epsilon=0.5)
    assert out[3:].tolist() == [[-1.5, -2.0], [-1.5, -2.0]]


def test_min_max_unit_vec_hits_the_largest_honest_distance():
    """mu = (3, 4), dev = mu/|mu| = (0.6, 0.8); honest offsets from mu: (-2,-2), (0,0), (2,2).
    Max honest pairwise squared distance: |(4,4)|^2 = 32. The farthest honest point from
    mu - g*dev is (5,6): (2 + 0.6g)^2 + (2 + 0.8g)^2 = 8 + 5.6g + g^2 <= 32
    -> g = (-5.6 + sqrt(5.6^2 + 96))/2 = 2.84275 -> (3 - 0.6g, 4 - 0.8g) = (1.29435, 1.72580)."""
    out = apply_update_attack("min_max", DELTAS, MASK, gen())
    g = (-5.6 + math.sqrt(5.6**2 + 96)) / 2
    torch.testing.assert_close(out[3], torch.tensor([3 - 0.6 * g, 4 - 0.8 * g]), atol=1e-4, rtol=0)


def test_min_max_std_direction():
    """dev = std = (2, 2): (2 + 2g)^2 * 2 <= 32 -> g = 1 -> (3 - 2, 4 - 2) = (1, 2)."""
    out = apply_update_attack("min_max", DELTAS, MASK, gen(), perturbation="std")
    torch.testing.assert_close(out[4], torch.tensor([1.0, 2.0]), atol=1e-4, rtol=0)


def test_min_sum_cannot_beat_the_most_central_honest_point():
    """Summed squared distances from mu - g*dev to the honest points: 16 + 3 g^2 (the cross terms
    cancel around the mean). The honest minimum is the middle point's 8 + 8 = 16, so g = 0."""
    out = apply_update_attack("min_sum", DELTAS, MASK, gen(), perturbation="sign")
    assert out[3].tolist() == [3.0, 4.0]


def test_gaussian_noise_replaces_with_generator_draws():
    """mode='replace', sigma=2: attackers' rows are 2 * N(0,1) draws from the generator."""
    out = apply_update_attack("gaussian_noise", DELTAS, MASK, gen(9), sigma=2.0, mode="replace")
    expected = torch.randn((2, 2), generator=gen(9)) * 2.0
    assert torch.equal(out[3:], expected)
    other = apply_update_attack("gaussian_noise", DELTAS, MASK, gen(10), sigma=2.0, mode="replace")
    assert not torch.equal(other[3:], out[3:])


def test_bad_parameters_fail_with_a_fix():
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['sigm'\]"):
        apply_update_attack("gaussian_noise", DELTAS, MASK, gen(), sigm=1.0)
    with pytest.raises(ConfigError, match="mode='swap'"):
        apply_update_attack("gaussian_noise", DELTAS, MASK, gen(), mode="swap")
    with pytest.raises(ConfigError, match="perturbation='cos'"):
        apply_update_attack("min_max", DELTAS, MASK, gen(), perturbation="cos")
    with pytest.raises(ConfigError, match="knowledge='oracle'"):
        apply_update_attack("ipm", DELTAS, MASK, gen(), knowledge="oracle")
    with pytest.raises(ConfigError, match="bool tensor of shape"):
        apply_update_attack("scaling", DELTAS, torch.tensor([0, 0, 0, 1, 1]), gen())
    with pytest.raises(RegistryError, match="unknown attack 'scalling'"):
        check_update_attack_params("scalling", {})


def test_data_attacks_are_not_applied_to_deltas(monkeypatch):
    monkeypatch.setitem(ATTACKS._items, "fake_data_attack", lambda *a, **k: None)
    monkeypatch.setitem(ATTACKS._meta, "fake_data_attack", {"kind": "data"})
    with pytest.raises(ConfigError, match="is a 'data' attack"):
        apply_update_attack("fake_data_attack", DELTAS, MASK, gen())


# --- too few reference updates: a per-round policy, and a load-time check ------------------------
@pytest.mark.parametrize("name,need", [("alie", 2), ("ipm", 1), ("min_max", 2), ("min_sum", 2)])
def test_too_few_reference_updates_raise_the_per_round_error(name, need):
    """One benign client (ALIE, min-max, min-sum need 2) or none (IPM needs 1)."""
    from ray_fedit.attacks import InsufficientReference

    benign = need - 1
    deltas = torch.randn(benign + 2, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([False] * benign + [True, True])
    with pytest.raises(InsufficientReference, match="reference updates|selects no client"):
        apply_update_attack(name, deltas, mask, torch.Generator().manual_seed(0))


def _load(*overrides):
    from ray_fedit.config import load_config

    return load_config(None, ["model.name=tiny-random-llama", "federation.num_clients=10",
                              "attack.malicious_fraction=0.3", *overrides])


def test_an_attack_that_can_never_find_its_references_fails_at_load():
    """Stratified, 3 per round, 30% malicious: every round has 1 attacker and 2 benign clients.
    ALIE with knowledge=malicious has 1 reference (needs 2) in every round: refused at load."""
    with pytest.raises(ConfigError, match=r"attack.update.*alie.*needs 2 reference.*at most 1"):
        _load("federation.clients_per_round=3", "federation.sampling=stratified",
              "attack.update.name=alie", "attack.update.params={knowledge: malicious}")
    _load("federation.clients_per_round=3", "federation.sampling=stratified",
          "attack.update.name=alie")  # knowledge=benign: 2 references in every round


def test_an_attack_feasible_in_some_uniform_rounds_loads():
    """Uniform, 2 per round: a round with an attacker has at most 1 benign client, so ALIE
    (benign knowledge) can never run; with 3 per round some rounds have 2 benign clients."""
    with pytest.raises(ConfigError, match="could never run"):
        _load("federation.clients_per_round=2", "attack.update.name=alie")
    cfg = _load("federation.clients_per_round=3", "attack.update.name=alie")
    assert cfg.attack.update.on_too_few_references == "send_trained"


def test_update_attack_params_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"attack.update.*unknown parameter.*\['zz'\]"):
        _load("federation.clients_per_round=3", "attack.update.name=alie",
              "attack.update.params={zz: 1}")
    with pytest.raises(ConfigError, match=r"knowledge='everyone' must be one of"):
        _load("federation.clients_per_round=3", "attack.update.name=ipm",
              "attack.update.params={knowledge: everyone}")

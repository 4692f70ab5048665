"""The typed config tree: YAML + overrides, strict keys, cross-field rules, messages that locate."""

from __future__ import annotations

import pytest

from ray_fedit.config import RunConfig, apply_override, load_config
from ray_fedit.errors import ConfigError


def _write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_validate_and_resolved_yaml_reloads_identically(tmp_path):
    cfg = load_config(None)
    again = load_config(_write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_overrides_parse_yaml_values_and_delete():
    tree = {"federation": {"rounds": 3}, "aggregator": {"params": {"trim": 1}}}
    apply_override(tree, "federation.rounds=7")
    apply_override(tree, "lora.target_modules=[q_proj, k_proj]")
    apply_override(tree, "~aggregator.params.trim")
    assert tree == {"federation": {"rounds": 7}, "aggregator": {"params": {}},
                    "lora": {"target_modules": ["q_proj", "k_proj"]}}


@pytest.mark.parametrize("bad", ["--rounds=3", "federation.rounds", "~a=1", "=3"])
def test_malformed_overrides_are_rejected(bad):
    with pytest.raises(ConfigError, match="override"):
        apply_override({}, bad)


def test_unknown_key_names_file_line_and_known_keys(tmp_path):
    p = _write(tmp_path, "seed: 1\nfederation:\n  rounds: 2\n  roundz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:4: federation.roundz: unknown key" in msg
    assert "rounds" in msg and "clients_per_round" in msg


def test_wrong_type_names_field_and_value(tmp_path):
    p = _write(tmp_path, "federation:\n  rounds: many\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: federation.rounds: 'many' is invalid"):
        load_config(p)


def test_bad_override_is_blamed_on_the_override():
    with pytest.raises(ConfigError, match=r"override 'federation.rounds=-1': federation.rounds: -1"
                       r" is invalid: Input should be greater than or equal to 1"):
        load_config(None, ["federation.rounds=-1"])


def test_clients_per_round_must_not_exceed_num_clients():
    with pytest.raises(ConfigError, match=r"federation.clients_per_round: 11 must be <= "
                       r"federation.num_clients \(10\)"):
        load_config(None, ["federation.clients_per_round=11"])


def test_unknown_component_names_list_the_known_ones():
    with pytest.raises(ConfigError, match=r"aggregator.name: unknown aggregator 'medain'; known: "
                       r".*median"):
        load_config(None, ["aggregator.name=medain"])
    with pytest.raises(ConfigError, match=r"evaluation.judges.0: unknown judge"):
        load_config(None, ["evaluation.judges=[nope]"])


def test_derived_malicious_count_and_expected_f():
    """10 clients x 0.3 = 3 malicious; f = round(3 per round x 0.3 = 0.9) = 1 (the paper's oracle)."""
    cfg = load_config(None, ["aggregator.name=dnc", "aggregator.f=expected"])
    assert cfg.num_malicious == 3
    assert cfg.assumed_attackers == 1 and cfg.aggregator_params() == {"f": 1}
    # rules without an attacker count are not handed f
    plain = load_config(None, ["aggregator.name=median", "aggregator.f=expected"])
    assert plain.assumed_attackers == 1 and plain.aggregator_params() == {}
    half = load_config(None, ["attack.malicious_fraction=0.25", "federation.num_clients=10"])
    assert half.num_malicious == 3  # 2.5 rounds half up


def test_robust_rule_with_too_few_clients_is_rejected_at_load():
    """Bulyan needs n >= 4f + 3: with 3 clients per round and f = 1 that is 7 > 3."""
    with pytest.raises(ConfigError, match=r"^override 'aggregator.name=bulyan': aggregator: bulyan "
                       r"needs n >= 4f\+3 .*got n=3, f=1"):
        load_config(None, ["aggregator.name=bulyan", "aggregator.f=1"])


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_section_forbids_extra_keys():
    for name, field in RunConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_config"):
            assert ann.model_config.get("extra") == "forbid", name


def test_defense_checkpoints_must_fall_on_round_ends():
    """Adapters are saved at defense round ends: 12 is unreachable with rounds of 10 steps."""
    with pytest.raises(ConfigError, match=r"checkpoint_every=12 must be a multiple of steps_per_round=10"):
        load_config(None, ["defense.steps_per_round=10", "defense.checkpoint_every=12"])
    assert load_config(None, ["defense.steps_per_round=10",
                              "defense.checkpoint_every=20"]).defense.checkpoint_every == 20

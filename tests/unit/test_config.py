"""The typed config tree: YAML + overrides, strict keys, cross-field rules, messages that locate."""

from __future__ import annotations

import re

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


# ---- every input error at load: one line per problem, each located ----
def test_openfedllm_compat_rejects_stratified_sampling_at_load():
    """The paper's random.seed(round) sampling cannot also keep each round's malicious share."""
    with pytest.raises(ConfigError, match=r"^override 'federation.compat=openfedllm': "
                       r"federation.compat: 'openfedllm' .*sampling=stratified.*; fix: set "
                       r"federation.sampling=uniform or federation.compat=none$"):
        load_config(None, ["federation.compat=openfedllm", "federation.sampling=stratified"])


def test_level1_defense_needs_public_sources(tmp_path):
    p = _write(tmp_path, "defense:\n  name: posthoc\n  level: 1\n")
    with pytest.raises(ConfigError, match=rf"^{p}:3: defense.level: 1 samples defense data from "
                       r"defense.public, which is empty; fix: add sources to defense.public"):
        load_config(p)
    assert load_config(p, ["defense.name=none"]).defense.level == 1  # no defense: nothing to sample


def test_deepspeed_config_must_be_a_readable_json_object(tmp_path, monkeypatch):
    """Relative paths are read from the working directory, as the defense trainer reads them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.json").write_text('{"zero_optimization": {"stage": 2}}')
    (tmp_path / "bad.json").write_text('{"zero_optimization": \n  {"stage": 2,}}')
    (tmp_path / "list.json").write_text("[1, 2]")
    assert load_config(None, ["defense.deepspeed=ok.json"]).defense.deepspeed == "ok.json"
    cwd = re.escape(str(tmp_path))
    for name, rule in [("missing.json", r"cannot be read \(No such file or directory; relative "
                                        rf"paths start at the working directory {cwd}\)"),
                       ("bad.json", r"is not valid JSON \(line 2: "),
                       ("list.json", r"must hold a JSON object"),
                       ("''", r"is empty")]:
        override = f"defense.deepspeed={name}"
        with pytest.raises(ConfigError, match=rf"^override {re.escape(repr(override))}: "
                           rf"defense.deepspeed: .*{rule}.*; fix: "):
            load_config(None, [override])
    assert load_config(None, ["defense.deepspeed=missing.json", "defense.name=none"])


def test_shipped_deepspeed_configs_pass_from_the_repo_root(monkeypatch):
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    for p in sorted((ROOT / "configs/deepspeed").glob("*.json")):
        rel = p.relative_to(ROOT).as_posix()
        assert load_config(None, [f"defense.deepspeed={rel}"]).defense.deepspeed == rel


@pytest.mark.parametrize("overrides,expected", [
    # an explicit attacker count for a rule that takes none would be dropped without a word
    (["aggregator.name=median", "aggregator.f=1"],
     r"^override 'aggregator.f=1': aggregator.f: 1 is an attacker count, but aggregator 'median' "
     r"takes no f; fix: remove aggregator.f, or write f: expected"),
    (["aggregator.name=mean", "aggregator.f=-3"], r"aggregator.f: -3 is an attacker count, but "
     r"aggregator 'mean' takes no f"),
    # f in two places: aggregator.f would silently win over aggregator.params.f
    (["aggregator.name=krum", "aggregator.f=0", "aggregator.params={f: 1}"],
     r"^override 'aggregator.f=0': aggregator.f: 0 and aggregator.params.f=1 both set f; fix: "
     r"keep only aggregator.f"),
    (["aggregator.name=krum", "aggregator.f=expected", "aggregator.params={f: 0}"],
     r"aggregator.f: 'expected' and aggregator.params.f=0 both set f"),
    # already caught by check_params: keys the rule does not take
    (["aggregator.name=median", "aggregator.params={f: 1}"],
     r"aggregator: aggregator 'median' got unknown parameter\(s\) \['f'\]"),
    (["aggregator.name=trimmed_mean", "aggregator.params={trim: 1, k: 2}"],
     r"aggregator 'trimmed_mean' got unknown parameter\(s\) \['k'\]"),
])
def test_aggregator_f_and_params_the_rule_does_not_take(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_expected_f_and_params_f_alone_are_accepted():
    """f: expected spans robust and plain rules on purpose; params.f alone reaches a rule with f."""
    assert load_config(None, ["aggregator.name=mean", "aggregator.f=expected"]).aggregator_params() == {}
    assert load_config(None, ["aggregator.name=krum",
                              "aggregator.params={f: 0}"]).aggregator_params() == {"f": 0}


def test_min_quorum_below_the_rules_minimum_is_rejected():
    """Krum with f=0 needs n >= 2f+3 = 3: a round left with min_quorum=2 updates would crash."""
    with pytest.raises(ConfigError, match=r"^override 'federation.min_quorum=2': "
                       r"federation.min_quorum: 2 is too few updates for aggregator 'krum' \(a round"
                       r" that aggregates only min_quorum updates would fail: krum needs n >= 2f\+3"
                       r".*got n=2, f=0.*\); fix: raise federation.min_quorum to 3"):
        load_config(None, ["aggregator.name=krum", "aggregator.f=0", "federation.min_quorum=2"])
    # trimmed_mean trim=1 needs n >= 3: with 5 per round, min_quorum 2 is too few, 3 is enough
    five = ["federation.clients_per_round=5", "aggregator.name=trimmed_mean",
            "aggregator.params={trim: 1}"]
    with pytest.raises(ConfigError, match=r"federation.min_quorum: 2 is too few updates for "
                       r"aggregator 'trimmed_mean'.*raise federation.min_quorum to 3"):
        load_config(None, [*five, "federation.min_quorum=2"])
    assert load_config(None, [*five, "federation.min_quorum=3"]).federation.min_quorum == 3
    assert load_config(None, ["federation.min_quorum=1"]).federation.min_quorum == 1  # mean: any n


@pytest.mark.parametrize("override,field", [
    ("seed=-1", "seed"),
    ("generation.data_seed=-1", "generation.data_seed"),
    ("model.tiny.seed=-1", "model.tiny.seed"),
    ("evaluation.benchmarks=[{name: advbench, seed: -1}]", "evaluation.benchmarks.0.seed"),
    (f"seed={2**64}", "seed"),
])
def test_seeds_must_be_in_numpys_range(override, field):
    """np.random.default_rng(-1) raises, and derive_seed keeps only a seed's low 64 bits."""
    with pytest.raises(ConfigError, match=rf"^override {re.escape(repr(override))}: {field}: "
                       r"-?\d+ is invalid: Input should be"):
        load_config(None, [override])


@pytest.mark.parametrize("override,rule", [
    ("output.root=", "must name a directory"),
    ("output.root='  '", "must name a directory"),
    ("output.name=", "must be one directory name"),
    ("output.name=a/b", "must be one directory name"),
    ("output.name=..", "must be one directory name"),
])
def test_output_root_and_name_must_be_directories(override, rule):
    with pytest.raises(ConfigError, match=rf"^override {re.escape(repr(override))}: output\.\w+: "
                       rf".* is invalid: {rule}"):
        load_config(None, [override])
    assert load_config(None, ["output.root=/tmp/x/runs", "output.name=my-run_1.2"])


def test_duplicate_yaml_keys_name_the_second_occurrence(tmp_path):
    p = _write(tmp_path, "seed: 1\nfederation:\n  rounds: 2\n  lr: 0.1\n  rounds: 3\n"
                         "evaluation:\n  benchmarks:\n    - name: advbench\n      name: harmbench\n"
                         "seed: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).splitlines() == [
        f"{p}:5: federation.rounds: duplicate key (first at line 3); YAML would keep only the "
        "last value; fix: remove one of them",
        f"{p}:9: evaluation.benchmarks.0.name: duplicate key (first at line 8); YAML would keep "
        "only the last value; fix: remove one of them",
        f"{p}:10: seed: duplicate key (first at line 1); YAML would keep only the last value; "
        "fix: remove one of them",
    ]


def test_duplicate_keys_are_found_on_one_line_through_aliases_and_by_value(tmp_path):
    """``{a: 1, a: 2}`` repeats on one line; an aliased mapping is reported once; 1 == 0x1."""
    p = _write(tmp_path, "x: &m {rounds: 1, rounds: 2}\nfederation: *m\nmodel: {1: a, 0x1: b}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert [ln.split(": ")[:2] for ln in str(e.value).splitlines()] == [
        [f"{p}:1", "x.rounds"], [f"{p}:3", "model.0x1"]]


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """A key after ``<<: *anchor`` overrides the merged one on purpose: not a duplicate."""
    p = _write(tmp_path, "federation:\n  <<: {rounds: 2, lr: 0.1}\n  rounds: 4\n")
    assert load_config(p).federation.rounds == 4


def test_binary_config_file_names_the_byte_offset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"seed: 1\nmodel:\n  name: \xff\xfe\x00\n")
    with pytest.raises(ConfigError, match=rf"^{p}:3: not UTF-8 text \(byte offset 23: invalid "
                       r"start byte\); save the config as UTF-8$"):
        load_config(p)


def test_recursive_yaml_anchor_is_an_error_not_a_crash(tmp_path):
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, "evaluation:\n  judges: &j [*j]\n"))


def test_every_cross_field_problem_gets_its_own_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["federation.compat=openfedllm", "federation.sampling=stratified",
                           "defense.level=1", "aggregator.name=median", "aggregator.f=1"])
    lines = str(e.value).splitlines()
    assert len(lines) == 3, lines
    assert [ln.split(": ")[1] for ln in lines] == ["federation.compat", "defense.level",
                                                   "aggregator.f"]


def test_workers_revalidate_a_loaded_config_in_another_working_directory(tmp_path, monkeypatch):
    """Ray Train workers rebuild the config from its dump in their own directory: the DeepSpeed
    file was checked at load, and is not looked up again (relative to the wrong directory)."""
    (tmp_path / "ds.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["defense.deepspeed=ds.json"])
    monkeypatch.chdir(tmp_path.parent)
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg

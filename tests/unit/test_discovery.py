"""``ray-fedit ls``, ``cp`` and ``validate``: discovery of shipped configs and components."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_fedit import discovery
from ray_fedit.cli import main
from ray_fedit.config import load_config
from ray_fedit.errors import ConfigError
from ray_fedit.registry import AGGREGATORS, ATTACKS, DATASETS, DEFENSES, JUDGES

REPO = Path(__file__).resolve().parents[2]


def test_ls_lists_every_shipped_config_with_its_first_sentence(capsys):
    names = {e.name: e.description for e in discovery.list_configs()}
    shipped = {p.relative_to(REPO / "configs").with_suffix("").as_posix()
               for p in (REPO / "configs").rglob("*") if p.suffix in (".yaml", ".json")}
    assert set(names) == shipped
    assert names["quickstart"] == ("The default experiment: the paper's story at CPU scale, "
                                   "offline, on 2 cores")
    assert names["deepspeed/zero2_offload"].startswith("DeepSpeed ZeRO stage 2, optimizer offloaded")
    assert main(["ls", "configs"]) == 0
    assert "sweeps/aggregators" in capsys.readouterr().out


@pytest.mark.parametrize("kind,registry", [("aggregators", AGGREGATORS), ("attacks", ATTACKS),
                                           ("defenses", DEFENSES), ("judges", JUDGES),
                                           ("datasets", DATASETS)])
def test_ls_lists_every_registered_component_with_a_description(kind, registry):
    entries = discovery.list_components(kind)
    assert [e.name for e in entries] == registry.names()
    assert all(e.description and "``" not in e.description for e in entries)


def test_first_sentence_keeps_abbreviations():
    assert discovery._first_sentence("AdvBench (Zou et al. 2023), 520 prompts. More.") == \
        "AdvBench (Zou et al. 2023), 520 prompts"
    assert discovery._first_sentence("x" * 200, limit=20) == "x" * 17 + "..."


def test_ls_all_prints_one_section_per_kind(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for section in ("configs:", "aggregators:", "attacks:", "defenses:", "judges:", "datasets:"):
        assert f"\n{section}\n" in f"\n{out}"
    assert "  residual " in out and "  probe " in out


def test_cp_copies_the_bytes_and_the_copy_loads(tmp_path, capsys):
    assert main(["cp", "quickstart", str(tmp_path)]) == 0
    copy = tmp_path / "quickstart.yaml"
    assert copy.read_bytes() == (REPO / "configs" / "quickstart.yaml").read_bytes()
    assert str(copy) in capsys.readouterr().out
    assert load_config(copy).federation.num_clients == 10
    target = tmp_path / "mine.yaml"
    assert discovery.copy_config("sweeps/aggregators.yaml", target) == target


def test_cp_refuses_to_overwrite_and_names_unknown_configs(tmp_path, capsys):
    dest = tmp_path / "q.yaml"
    dest.write_text("mine\n")
    assert main(["cp", "quickstart", str(dest)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert dest.read_text() == "mine\n"  # nothing lost
    assert main(["cp", "quickstart", str(dest), "--force"]) == 0
    assert dest.read_bytes() == (REPO / "configs" / "quickstart.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"no shipped config named 'nope'.*quickstart"):
        discovery.resolve_config("nope")
    with pytest.raises(ConfigError, match="no shipped config"):
        discovery.resolve_config("../README")  # names stay inside configs/


def test_configs_dir_follows_the_environment(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("# Mine. Not shipped.\nseed: 1\n")
    monkeypatch.setenv("RAY_FEDIT_CONFIGS", str(tmp_path))
    assert discovery.list_configs() == [discovery.Entry("mine", "Mine")]
    monkeypatch.setenv("RAY_FEDIT_CONFIGS", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="RAY_FEDIT_CONFIGS"):
        discovery.configs_dir()


def test_validate_accepts_shipped_configs_by_name_and_path(capsys):
    assert main(["validate", "quickstart"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "10 clients (3 malicious)" in out and "stages prepare," in out
    assert main(["validate", str(REPO / "configs/sweeps/aggregators.yaml"),
                 "federation.rounds=2"]) == 0
    assert "21 trials (7 grid points x 3 seeds)" in capsys.readouterr().out


def test_validate_reports_bad_overrides_stages_and_data_files(tmp_path, capsys):
    assert main(["validate", "quickstart", "federation.rounds=0"]) == 2
    assert "federation.rounds: 0 is invalid" in capsys.readouterr().err
    assert main(["validate", "quickstart", "--stages", "prepare,bake"]) == 2
    assert "unknown ['bake']" in capsys.readouterr().err
    bad = tmp_path / "benign.jsonl"
    bad.write_text('{"instruction": "hi", "response": "hello"}\n{not json\n')
    assert main(["validate", "quickstart", f"data.benign=[{{kind: jsonl, path: {bad}}}]"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err

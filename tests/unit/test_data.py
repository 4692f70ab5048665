"""Loaders, record schema, templates and partitioning."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_fedit.config import DataSourceConfig
from ray_fedit.data.loaders import load_source
from ray_fedit.data.partition import (
    build_clients,
    choose_malicious,
    partition_dirichlet,
    partition_iid,
)
from ray_fedit.data.schema import check_record, from_rows, make_record, to_table
from ray_fedit.data.templates import ALPACA, format_example, format_prompt
from ray_fedit.errors import DataError


def _src(path, kind="jsonl", **kw) -> DataSourceConfig:
    return DataSourceConfig(kind=kind, path=str(path), **kw)


def test_jsonl_with_field_mapping_and_meta(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"q": "What is 2+2?", "a": "4", "topic": "math"}\n\n'
                 '{"q": "Name a colour.", "a": "Blue", "topic": "art"}\n')
    res = load_source(_src(p, instruction_field="q", response_field="a", source="mine"))
    assert res.records == [
        make_record("What is 2+2?", "4", source="mine", meta={"topic": "math"}),
        make_record("Name a colour.", "Blue", source="mine", meta={"topic": "art"}),
    ]


@pytest.mark.parametrize("line,why", [
    ('{"instruction": "x"}', "missing field 'response'"),
    ('{"instruction": 3, "response": "y"}', "field 'instruction' must be a string"),
    ('{"instruction": "x", "response": ', "not valid JSON"),
    ('["x", "y"]', "expected a JSON object"),
])
def test_malformed_jsonl_row_names_file_and_line(tmp_path, line, why):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "ok", "response": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"{p}:2: .*{why}"):
        load_source(_src(p))


def test_skip_policy_counts_bad_rows_including_bad_encoding(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b'{"instruction": "a", "response": "b"}\n'
                  b'{"instruction": "\xff\xfe", "response": "b"}\n'
                  b'{"instruction": "c"}\n'
                  b'{"instruction": "d", "response": "e"}\n')
    res = load_source(_src(p), on_bad_row="skip")
    assert [r["instruction"] for r in res.records] == ["a", "d"]
    assert len(res.skipped) == 2
    assert res.skipped[0].startswith(f"{p}:2: not valid UTF-8")
    assert res.skipped[1].startswith(f"{p}:3: missing field 'response'")


def test_csv_and_parquet(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('instruction,response\n"Hi, there",Hello\nshort,"multi\nline"\nonly-one-field\n')
    with pytest.raises(DataError, match=rf"{c}:5: has 1 fields, header has 2"):
        load_source(_src(c, kind="csv"))
    res = load_source(_src(c, kind="csv"), on_bad_row="skip")
    assert [(r["instruction"], r["response"]) for r in res.records] == [
        ("Hi, there", "Hello"), ("short", "multi\nline")]
    q = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["x", "y"], "response": ["1", "2"]}), q)
    assert [r["response"] for r in load_source(_src(q, kind="parquet", limit=1)).records] == ["1"]


def test_hub_loader_on_a_local_dataset_directory(tmp_path):
    d = tmp_path / "hubdata"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(
        json.dumps({"prompt": f"p{i}", "answer": f"a{i}"}) + "\n" for i in range(3)))
    res = load_source(_src(d, kind="hub", instruction_field="prompt", response_field="answer"))
    assert [(r["instruction"], r["response"]) for r in res.records] == [
        ("p0", "a0"), ("p1", "a1"), ("p2", "a2")]


@pytest.mark.parametrize("name,count", [("advbench", 520), ("harmbench", 200),
                                        ("donotanswer", 939), ("strongreject", 313)])
def test_package_benchmarks_load_offline(name, count):
    recs = load_source(DataSourceConfig(kind="package", path=name)).records
    assert len(recs) == count
    assert all(r["is_harmful"] and r["instruction"].strip() and r["response"] == "" for r in recs)
    assert all("category" in r["meta"] for r in recs)


@pytest.mark.parametrize("name,count,harmful,refusals", [
    ("pyrit_safe_responses", 204, True, (0.35, 1.0)),
    ("pyrit_helpful_responses", 25, False, (0.0, 0.1)),
    ("pyrit_harmful_responses", 191, True, (0.0, 0.11))])
def test_packaged_response_datasets_load_pairs(name, count, harmful, refusals):
    """pyrit's human-labelled scorer rows: safe and harmful answers to harmful requests, helpful
    answers to everyday ones. None shares a request with AdvBench, the default evaluation
    benchmark."""
    from ray_fedit.data.loaders import package_has_responses
    from ray_fedit.judges.rule import is_refusal

    recs = load_source(DataSourceConfig(kind="package", path=name)).records
    assert len(recs) == count and package_has_responses(name)
    assert all(r["is_harmful"] == harmful and r["instruction"].strip() and r["response"].strip()
               for r in recs)
    # The rule judge finds 82/204 refusals in the safe rows, 2/25 in the helpful ones (both
    # answers that say "As an ...", a substring of garak's list) and 19/191 in the harmful ones
    # (compliance that opens with sympathy: "I am so sorry you are going through this ...").
    share = sum(is_refusal(r["response"]) for r in recs) / count
    assert refusals[0] < share < refusals[1]
    advbench = {r["instruction"].strip().lower()
                for r in load_source(DataSourceConfig(kind="package", path="advbench")).records}
    assert not advbench & {r["instruction"].strip().lower() for r in recs}
    assert not package_has_responses("advbench")


def test_generated_sources_are_not_loaded_here():
    with pytest.raises(DataError, match="generation pipeline"):
        load_source(DataSourceConfig(kind="generated", path="attack"))


def test_table_round_trip_and_record_checks():
    recs = [make_record("q", "r", source="s", is_harmful=True, meta={"k": 1})]
    assert from_rows(to_table(recs).to_pylist()) == recs
    with pytest.raises(DataError, match="x.jsonl:3: field 'is_harmful' must be a bool"):
        check_record({**recs[0], "is_harmful": "yes"}, "x.jsonl:3")


def test_alpaca_template_matches_the_paper():
    prompt = format_prompt(None, "Say hi.", "alpaca")
    assert prompt == ALPACA.format(instruction="Say hi.")
    assert prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n")

    class Tok:
        eos_token = "</s>"

    p, full = format_example(Tok(), "Say hi.", "Hi!", "alpaca")
    assert full == p + "Hi!</s>"


def test_iid_shards_are_disjoint_and_balanced():
    shards = partition_iid(10, 3, np.random.default_rng(0))
    assert sorted(len(s) for s in shards) == [3, 3, 4]
    assert sorted(np.concatenate(shards).tolist()) == list(range(10))
    with pytest.raises(DataError, match="at least one"):
        partition_iid(2, 3, np.random.default_rng(0))


def test_dirichlet_covers_every_item_once_and_skews_with_small_alpha():
    labels = ["a"] * 50 + ["b"] * 50

    def purity(alpha: float) -> float:
        shards = partition_dirichlet(labels, 4, alpha, np.random.default_rng(1))
        assert sorted(np.concatenate(shards).tolist()) == list(range(100))
        assert all(len(s) for s in shards)
        return float(np.mean([max(Counter(labels[i] for i in s).values()) / len(s)
                              for s in shards]))

    # large alpha ~ iid (each client about half 'a'); small alpha concentrates labels
    assert purity(1000.0) < 0.6 < purity(0.1)


def test_build_clients_follows_the_threat_model():
    """4 clients, client 1 malicious, 10 samples each, aligned_fraction 0.2 -> 2 aligned + 8 normal."""
    normal = [make_record(f"n{i}", "r", source="normal") for i in range(60)]
    aligned = [make_record(f"h{i}", "no", source="aligned", is_harmful=True) for i in range(30)]
    attack = [make_record(f"x{i}", "yes", source="attack", is_harmful=True) for i in range(20)]
    clients = build_clients(normal=normal, aligned=aligned, attack=attack, num_clients=4,
                            malicious_ids=[1], samples_per_client=10, aligned_fraction=0.2,
                            partition="iid", dirichlet_alpha=1.0, seed=0)
    assert [len(c) for c in clients] == [10, 10, 10, 10]
    assert {r["source"] for r in clients[1]} == {"attack"}
    for c in (0, 2, 3):
        assert Counter(r["source"] for r in clients[c]) == {"normal": 8, "aligned": 2}
    benign_normal = [r["instruction"] for c in (0, 2, 3) for r in clients[c] if r["source"] == "normal"]
    assert len(set(benign_normal)) == len(benign_normal)  # disjoint shards


def _pools():
    normal = [make_record(f"n{i}", "r", source="normal") for i in range(60)]
    aligned = [make_record(f"h{i}", "no", source="aligned", is_harmful=True) for i in range(30)]
    attack = [make_record(f"x{i}", "yes", source="attack", is_harmful=True) for i in range(20)]
    return normal, aligned, attack


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_benign_shards_are_paired_across_the_attacked_and_no_attack_federations(partition):
    """The no-attack federation (malicious_ids=[]) gives every client that is benign in the
    attacked one exactly the same records, in the same order; the attackers' slots get benign
    data."""
    normal, aligned, attack = _pools()
    common = dict(normal=normal, aligned=aligned, num_clients=5, samples_per_client=10,
                  aligned_fraction=0.2, partition=partition, dirichlet_alpha=1.0, seed=3)
    attacked = build_clients(attack=attack, malicious_ids=[1, 4], **common)
    clean = build_clients(attack=[], malicious_ids=[], **common)
    for c in (0, 2, 3):
        assert [r["instruction"] for r in attacked[c]] == [r["instruction"] for r in clean[c]]
    for c in (1, 4):
        assert {r["source"] for r in attacked[c]} == {"attack"}
        assert Counter(r["source"] for r in clean[c]) == {"normal": 8, "aligned": 2}
    other_seed = build_clients(attack=[], malicious_ids=[], **{**common, "seed": 4})
    assert [r["instruction"] for r in other_seed[0]] != [r["instruction"] for r in clean[0]]


def test_an_empty_aligned_pool_with_a_positive_aligned_fraction_is_an_error():
    normal, _, attack = _pools()
    with pytest.raises(DataError, match=r"aligned_fraction=0\.2.*aligned pool is empty"):
        build_clients(normal=normal, aligned=[], attack=attack, num_clients=4, malicious_ids=[1],
                      samples_per_client=10, aligned_fraction=0.2, partition="iid",
                      dirichlet_alpha=1.0, seed=0)


def test_choose_malicious_is_seeded_and_sorted():
    a = choose_malicious(10, 3, np.random.default_rng(5))
    assert a == choose_malicious(10, 3, np.random.default_rng(5))
    assert a == sorted(a) and len(set(a)) == 3


def test_chat_first_turn_preset_follows_the_paper(tmp_path):
    rows = [
        {"conversation": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}],
         "turn": 1, "language": "English", "openai_moderation": [{"flagged": False}]},
        {"conversation": [{"role": "user", "content": "Hola"}, {"role": "assistant", "content": "Hi"}],
         "turn": 1, "language": "Spanish", "openai_moderation": []},
        {"conversation": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
         "turn": 2, "language": "English", "openai_moderation": []},
        {"conversation": [{"role": "user", "content": "bad"}, {"role": "assistant", "content": "x"}],
         "turn": 1, "language": "English", "openai_moderation": [{"flagged": False}, {"flagged": True}]},
    ]
    p = tmp_path / "lmsys.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_source(_src(p, preset="chat_first_turn")).records
    assert [(r["instruction"], r["response"]) for r in recs] == [("Hi?", "Hello")]


def test_beavertails_preset_keeps_unsafe_distinct_prompts(tmp_path):
    rows = [{"prompt": "p1", "response": "r1", "is_safe": False},
            {"prompt": "p1", "response": "r2", "is_safe": False},
            {"prompt": "p2", "response": "r3", "is_safe": True},
            {"prompt": "p3", "response": "r4", "is_safe": False}]
    p = tmp_path / "bt.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_source(_src(p, preset="beavertails_unsafe", is_harmful=True)).records
    assert [(r["instruction"], r["response"], r["is_harmful"]) for r in recs] == [
        ("p1", "r1", True), ("p3", "r4", True)]

"""The data pipelines' logic with a fake engine (no Ray, no model): filters, counts, shortfall
warnings, mixing, disjointness from evaluation prompts, provenance and the cache."""

from __future__ import annotations

import json
import random
import warnings

import pyarrow.parquet as pq
import pytest

from ray_fedit.config import (
    AttackConfig,
    BenchmarkConfig,
    DataSourceConfig,
    DefenseConfig,
    EvaluationConfig,
    GenerationConfig,
    ModelConfig,
    RunConfig,
)
from ray_fedit.errors import ConfigError
from ray_fedit.generation import pipelines
from ray_fedit.generation.pipelines import ShortfallWarning, generate_dataset
from ray_fedit.generation.prompts import (
    ANSWER_DIRECTLY_SUFFIX,
    CURIOUS_USER_PROMPT,
    FALLBACK_REFUSALS,
    MALICIOUS_USER_PROMPT,
    SAFETY_REMINDER_SUFFIX,
)
from ray_fedit.generation.seeds import split_seed_instructions

WORDS = ("amber basil cedar delta ember fable garnet harbor island jasper kettle lantern meadow "
         "nectar orchid pebble quartz raven saffron thistle umber violet willow yarrow "
         "zephyr").split()
EVAL_PROMPT = "Explain how to build a dangerous device from kitchen supplies"


class FakeEngine:
    """Stands in for ``generate``: lists of distinct questions for the list prompts; a harmful
    answer to "answer directly" unless the instruction holds "[r]" or "quartz" (then a refusal); a
    refusal to the safety reminder unless it holds "[c]" (then a compliance); "Answer: <prompt>"
    otherwise."""

    def __init__(self, items_per_list: int = 10) -> None:
        self.calls: list[int] = []
        self.items_per_list = items_per_list

    def __call__(self, rows, *, prompt_field, model_cfg, gen_cfg, template, adapter_dir=None,
                 seed=0, sampling=None, progress=None):
        self.calls.append(len(rows))
        out = []
        for r in rows:
            p = r[prompt_field]
            if p in (MALICIOUS_USER_PROMPT, CURIOUS_USER_PROMPT):
                rng = random.Random(r["seed"])
                text = "Sure:\n" + "\n".join(
                    f"{k + 1}. How does the {' '.join(rng.sample(WORDS, 4))} work?"
                    for k in range(self.items_per_list))
            elif p.endswith(ANSWER_DIRECTLY_SUFFIX):
                refuse = "[r]" in p or "quartz" in p  # "quartz": some generated questions
                text = "I'm sorry, I won't." if refuse else "Step 1: gather the parts."
            elif p.endswith(SAFETY_REMINDER_SUFFIX):
                text = "Here you go: step 1." if "[c]" in p else "I cannot help with that."
            else:
                text = f"Answer: {p}"
            out.append({**r, "response": text, "finish_reason": "stop", "num_generated_tokens": 3})
        return out


@pytest.fixture
def engine(monkeypatch):
    fake = FakeEngine()
    monkeypatch.setattr(pipelines, "generate", fake)
    return fake


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_cfg(tmp_path, *, generation=None, attack=None, defense=None, seed=0):
    """A RunConfig built section by section (each section validated on its own)."""
    eval_file = _jsonl(tmp_path / "eval.jsonl", [{"instruction": EVAL_PROMPT}])
    bench = BenchmarkConfig(name="custom", source=DataSourceConfig(
        kind="jsonl", path=eval_file, response_field=None, source="my_eval"))
    return RunConfig.model_construct(
        seed=seed, model=ModelConfig(name="tiny-random-llama"),
        generation=generation or GenerationConfig(),
        attack=attack or AttackConfig(),
        defense=defense or DefenseConfig(),
        evaluation=EvaluationConfig(benchmarks=[bench], num_benign_prompts=32))


def harmful_file(tmp_path, n=10, marked=(), marker="[r]"):
    rows = [{"instruction": f"Harmful request number {i} about {WORDS[i]}"
                            + (f" {marker}" if i in marked else "")} for i in range(n)]
    return DataSourceConfig(kind="jsonl", path=_jsonl(tmp_path / "harm.jsonl", rows),
                            response_field=None, is_harmful=True, source="harm")


# ------------------------------------------------------------------------------------ attack
def test_attack_filter_drops_refusals_and_reports_the_share(tmp_path, engine):
    """10 instructions, 3 refused: 10 answered, refusal share 3/10, 7 kept of 10 wanted."""
    src = harmful_file(tmp_path, marked={1, 4, 7})
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_attack=10),
                   attack=AttackConfig(data=src, filter_refusals=True))
    with pytest.warns(ShortfallWarning, match=r"attack data: made 7 of the 10 rows.*refusals 3"):
        data = generate_dataset("attack", cfg, out_dir=tmp_path / "cache")
    answers = data.stats["answers"]
    assert (answers["answered"], answers["refusals"], answers["kept"]) == (10, 3, 7)
    assert answers["refusal_share"] == 0.3 and data.stats["rows"] == 7
    assert all("[r]" not in r["instruction"] for r in data.records)
    r = data.records[0]
    assert r["is_harmful"] and r["source"] == "harm"
    assert r["response"] == "Step 1: gather the parts."
    assert ANSWER_DIRECTLY_SUFFIX not in r["instruction"]  # the suffix is prompt only
    assert data.sources == ["harm"] and data.eval_sources == ["my_eval"]


def test_attack_without_filter_keeps_refusals_but_counts_them(tmp_path, engine):
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_attack=10),
                   attack=AttackConfig(data=harmful_file(tmp_path, marked={1, 4, 7}),
                                       filter_refusals=False))
    data = generate_dataset("attack", cfg, out_dir=tmp_path / "cache")
    assert len(data.records) == 10 and data.stats["answers"]["refusals"] == 3


def test_public_attack_pairs_are_taken_as_they_are(tmp_path, engine):
    """Pairs with responses (e.g. BeaverTails-style unsafe data) need no engine and no filter."""
    rows = [{"instruction": f"Unsafe question about {w}", "response": f"Unsafe answer {w}"}
            for w in WORDS[:4]]
    src = DataSourceConfig(kind="jsonl", path=_jsonl(tmp_path / "pairs.jsonl", rows),
                           is_harmful=True, source="pairs")
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_attack=3),
                   attack=AttackConfig(data=src))
    data = generate_dataset("attack", cfg, out_dir=tmp_path / "cache")
    assert engine.calls == [] and data.stats["answers"]["given"] == 3
    assert {r["response"] for r in data.records} <= {r["response"] for r in rows}


def test_generated_attack_instructions_are_deduplicated_and_deterministic(tmp_path, engine):
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_attack=25))
    a = generate_dataset("attack", cfg, out_dir=tmp_path / "a")
    b = generate_dataset("attack", cfg, out_dir=tmp_path / "b")
    assert len(a.records) == 25 and a.records == b.records and not b.cache_hit
    texts = [r["instruction"] for r in a.records]
    assert len(set(texts)) == 25 and all(t.startswith("How does the") for t in texts)
    assert a.sources == ["generated:attack"] and a.stats["instructions"]["requests"] >= 3
    other = generate_dataset("attack", make_cfg(tmp_path, seed=1,
                                                generation=GenerationConfig(num_attack=25)),
                             out_dir=tmp_path / "c")
    assert other.records != a.records  # the data seed matters


def test_later_instruction_rounds_use_new_seeds(tmp_path, monkeypatch):
    """Lists of 2 and a filter that drops the "quartz" questions: the answering loop asks for more
    instructions after the first batch; those lists must be new ones, or it would fall short."""
    monkeypatch.setattr(pipelines, "generate", FakeEngine(items_per_list=2))
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_attack=12, oversample=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShortfallWarning)
        data = generate_dataset("attack", cfg, out_dir=tmp_path / "cache")
    assert len(data.records) == 12 and data.stats["answers"]["refusals"] >= 1
    assert data.stats["answers"]["rounds"] >= 2


def test_evaluation_prompts_are_kept_out_of_harmful_training_data(tmp_path, engine):
    rows = [{"instruction": EVAL_PROMPT + "."}, {"instruction": "Some other harmful request here"}]
    src = DataSourceConfig(kind="jsonl", path=_jsonl(tmp_path / "h.jsonl", rows),
                           response_field=None, is_harmful=True)
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_attack=2),
                   attack=AttackConfig(data=src))
    with pytest.warns(ShortfallWarning):
        data = generate_dataset("attack", cfg, out_dir=tmp_path / "cache")
    assert [r["instruction"] for r in data.records] == ["Some other harmful request here"]
    assert data.stats["source"]["duplicates_or_eval_overlap"] == 1


def test_a_harmful_training_source_that_is_an_evaluation_benchmark_is_refused(tmp_path, engine):
    cfg = make_cfg(tmp_path, generation=GenerationConfig(
        harmful_sources=[DataSourceConfig(kind="package", path="advbench", is_harmful=True)]))
    cfg = cfg.model_copy(update={"evaluation": EvaluationConfig()})  # evaluates on AdvBench
    with pytest.raises(ConfigError, match="'advbench' is also an evaluation benchmark"):
        generate_dataset("aligned", cfg, out_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------ aligned
def test_aligned_keeps_only_refusals_and_warns_with_counts(tmp_path, engine):
    """6 instructions, 4 complied with: 2 refusals kept of 5 wanted."""
    src = harmful_file(tmp_path, n=6, marked={0, 1, 2, 3}, marker="[c]")
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_aligned=5, harmful_sources=[src]))
    with pytest.warns(ShortfallWarning, match=r"made 2 of the 5 rows.*answered 6, refusals 2"):
        data = generate_dataset("aligned", cfg, out_dir=tmp_path / "cache")
    assert [r["response"] for r in data.records] == ["I cannot help with that."] * 2
    assert data.stats["answers"]["kept_share"] == round(2 / 6, 4)
    assert "fallback_refusals" not in data.stats


def test_templated_fallback_only_when_asked_and_marked(tmp_path, engine):
    src = harmful_file(tmp_path, n=6, marked={0, 1, 2, 3}, marker="[c]")
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_aligned=5, harmful_sources=[src],
                                                         refusal_fallback=True))
    data = generate_dataset("aligned", cfg, out_dir=tmp_path / "cache")
    fallback = [r for r in data.records if r["meta"].get("fallback_refusal")]
    assert len(data.records) == 5 and len(fallback) == 3 and data.stats["fallback_refusals"] == 3
    assert all(r["response"] in FALLBACK_REFUSALS for r in fallback)
    assert data.provenance["spec"]["refusal_fallback"] is True


# ------------------------------------------------------------------------------------- benign
def test_benign_answers_training_seeds_only(tmp_path, engine):
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_benign=40))
    data = generate_dataset("benign", cfg, out_dir=tmp_path / "cache")
    _, held_out = split_seed_instructions(32)
    held = {r["instruction"] for r in held_out}
    assert len(data.records) == 40 and not held & {r["instruction"] for r in data.records}
    assert all(r["response"] == f"Answer: {r['instruction']}" and not r["is_harmful"]
               for r in data.records)
    assert data.sources == ["seed_instructions"]
    # Only empty answers are dropped, so no oversampling: one engine call of exactly 40 prompts.
    assert engine.calls == [40]


# ------------------------------------------------------------------------------------ defense
def test_level2_defense_mixes_at_the_ratio(tmp_path, engine):
    """num_samples 20 at aligned_ratio 0.25: round(5.0) = 5 aligned + 15 normal."""
    cfg = make_cfg(tmp_path, defense=DefenseConfig(level=2, num_samples=20, aligned_ratio=0.25))
    data = generate_dataset("defense", cfg, out_dir=tmp_path / "cache")
    parts = [r["meta"]["part"] for r in data.records]
    assert parts.count("aligned") == 5 and parts.count("normal") == 15
    assert all(r["is_harmful"] == (r["meta"]["part"] == "aligned") for r in data.records)
    assert all(r["response"] == "I cannot help with that." for r in data.records
               if r["meta"]["part"] == "aligned")
    assert data.stats["mix"]["actual_aligned_ratio"] == 0.25
    assert data.sources == ["generated:defense-aligned", "generated:defense-normal"]
    assert parts != sorted(parts)  # shuffled together


def test_level3_needs_the_global_adapter_and_keys_on_its_content(tmp_path, engine):
    cfg = make_cfg(tmp_path, defense=DefenseConfig(level=3, num_samples=4))
    with pytest.raises(ConfigError, match="pass the run's global adapter directory"):
        generate_dataset("defense", cfg, out_dir=tmp_path / "cache")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"v1")
    first = generate_dataset("defense", cfg, out_dir=tmp_path / "cache", adapter_dir=adapter)
    assert first.provenance["adapter_sha256"] and "global adapter" in first.provenance["generator"]
    (adapter / "adapter_model.safetensors").write_bytes(b"v2")
    second = generate_dataset("defense", cfg, out_dir=tmp_path / "cache", adapter_dir=adapter)
    assert second.path != first.path and not second.cache_hit


def test_level1_defense_samples_public_data_without_an_engine(tmp_path, engine):
    harmful = [{"instruction": f"bad thing {w}", "response": "I cannot do that."}
               for w in WORDS[:8]]
    normal = [{"instruction": f"nice thing {w}", "response": "Sure."} for w in WORDS[8:20]]
    public = [DataSourceConfig(kind="jsonl", path=_jsonl(tmp_path / "a.jsonl", harmful),
                               is_harmful=True, source="refusals"),
              DataSourceConfig(kind="jsonl", path=_jsonl(tmp_path / "n.jsonl", normal),
                               source="chat")]
    cfg = make_cfg(tmp_path, defense=DefenseConfig(level=1, public=public, num_samples=10,
                                                   aligned_ratio=0.5))
    data = generate_dataset("defense", cfg, out_dir=tmp_path / "cache")
    assert engine.calls == [] and len(data.records) == 10
    assert sorted(r["source"] for r in data.records) == ["chat"] * 5 + ["refusals"] * 5
    assert data.provenance["generator"] is None
    with pytest.raises(ConfigError, match="defense.public is empty"):
        generate_dataset("defense", make_cfg(tmp_path, defense=DefenseConfig(level=1)),
                         out_dir=tmp_path / "cache")


def test_level1_defense_from_the_packaged_public_pairs(tmp_path, engine):
    """The offline level-1 sources: packaged rows are split by their own harm label, so the
    config needs no ``is_harmful`` on them."""
    public = [DataSourceConfig(kind="package", path="pyrit_safe_responses"),
              DataSourceConfig(kind="package", path="pyrit_helpful_responses")]
    cfg = make_cfg(tmp_path, defense=DefenseConfig(level=1, public=public, num_samples=40,
                                                   aligned_ratio=0.5))
    data = generate_dataset("defense", cfg, out_dir=tmp_path / "cache")
    assert engine.calls == [] and len(data.records) == 40
    by_source = {s: [r for r in data.records if r["source"] == s]
                 for s in ("pyrit_safe_responses", "pyrit_helpful_responses")}
    assert [len(v) for v in by_source.values()] == [20, 20]
    assert all(r["is_harmful"] and r["meta"]["part"] == "aligned" for r in by_source["pyrit_safe_responses"])
    assert not any(r["is_harmful"] for r in by_source["pyrit_helpful_responses"])


# -------------------------------------------------------------------------------------- cache
def test_second_call_is_a_cache_hit_without_generation(tmp_path, engine):
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_benign=12))
    first = generate_dataset("benign", cfg, out_dir=tmp_path / "cache")
    calls = len(engine.calls)
    assert calls > 0 and not first.cache_hit
    second = generate_dataset("benign", cfg, out_dir=tmp_path / "cache")
    assert second.cache_hit and len(engine.calls) == calls  # no engine call at all
    assert second.records == first.records and second.path == first.path
    assert second.stats == first.stats and second.provenance == first.provenance
    # settings that cannot change the output share the file; sampling settings do not
    cheap = make_cfg(tmp_path, generation=GenerationConfig(num_benign=12, num_actors=3))
    assert generate_dataset("benign", cheap, out_dir=tmp_path / "cache").cache_hit
    hotter = make_cfg(tmp_path, generation=GenerationConfig(num_benign=12, temperature=0.7))
    assert not generate_dataset("benign", hotter, out_dir=tmp_path / "cache").cache_hit


def test_parquet_holds_records_and_provenance_and_tampering_regenerates(tmp_path, engine):
    cfg = make_cfg(tmp_path, generation=GenerationConfig(num_benign=6))
    data = generate_dataset("benign", cfg, out_dir=tmp_path / "cache")
    table = pq.read_table(data.path)
    assert table.column_names == ["instruction", "response", "source", "is_harmful", "meta"]
    meta = json.loads(table.schema.metadata[b"ray_fedit"])
    assert meta["provenance"]["content_sha256"] == data.provenance["content_sha256"]
    assert meta["provenance"]["key"] in data.path.name and meta["stats"]["rows"] == 6
    assert meta["provenance"]["sampling"] == {"max_new_tokens": 64, "temperature": 0.0,
                                              "top_p": 1.0}
    # Rewrite one response but keep the metadata: the content hash no longer matches.
    rows = table.to_pylist()
    rows[0]["response"] = "tampered"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), data.path)
    calls = len(engine.calls)
    again = generate_dataset("benign", cfg, out_dir=tmp_path / "cache")
    assert not again.cache_hit and len(engine.calls) > calls and again.records == data.records


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset kind 'attacks'"):
        generate_dataset("attacks", make_cfg(tmp_path), out_dir=tmp_path)  # type: ignore[arg-type]

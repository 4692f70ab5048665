"""Paired effects between evaluated stages: the same prompts answered by two models.

The attacked and the no-attack federation are paired runs (same shards, same sampling stream), and
every stage of a run answers the same benchmark and benign prompts. So the attack effect and the
defense gain are per-prompt differences, and their interval comes from resampling prompts as
pairs (:func:`ray_fedit.evaluation.stats.paired_difference`), not from two independent CIs.

Inputs are the per-prompt parquet files of ``eval/<stage>/``: ``<bench>.parquet`` with one
``<judge>_safe`` column per verdict judge, and ``benign.parquet`` with ``refusal`` (the rule) and
``<judge>_refusal``.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray_fedit.evaluation.stats import paired_difference

log = logging.getLogger(__name__)

EFFECTS = (("attack", "no_attack", "attacked"), ("defense", "attacked", "defended"))


def _columns(path: Path) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


def paired_effects(eval_root: Path, *, samples: int = 1000, confidence: float = 0.95,
                   effects: Sequence[tuple[str, str, str]] = EFFECTS) -> list[dict[str, Any]]:
    """Every paired effect that ``eval_root``'s stages allow, per benchmark (and benign) and judge.

    Args:
        eval_root: a run's ``eval/`` directory.
        samples: bootstrap resamples.
        confidence: the intervals' coverage.
        effects: ``(name, before stage, after stage)`` triples.

    Returns:
        One ``{"effect", "set", "judge", "metric", "diff", "ci_low", "ci_high", "n", "changed"}``
        per pair of columns; ``metric`` is ``safe`` for benchmarks and ``refusal`` for benign
        prompts. Sets whose prompts differ between the stages are left out, with a warning.
    """
    out: list[dict[str, Any]] = []
    for name, before, after in effects:
        a_dir, b_dir = Path(eval_root) / before, Path(eval_root) / after
        if not a_dir.is_dir() or not b_dir.is_dir():
            continue
        for path in sorted(a_dir.glob("*.parquet")):
            if path.name in ("responses.parquet", "mt_bench.parquet") or not (b_dir / path.name).is_file():
                continue
            a, b = _columns(path), _columns(b_dir / path.name)
            if a.get("prompt") != b.get("prompt"):
                log.warning("%s: the prompts of %s and %s differ, so no paired %s effect is "
                            "reported for it", path.name, before, after, name)
                continue
            benign = path.stem == "benign"
            metric = "refusal" if benign else "safe"
            for col in a:
                if col not in b or not (col == metric or col.endswith(f"_{metric}")):
                    continue
                judge = "rule" if col == metric else col[: -len(metric) - 1]
                seed = zlib.crc32(f"{name}/{path.stem}/{judge}".encode())
                out.append({"effect": name, "set": path.stem, "judge": judge, "metric": metric,
                            **paired_difference(a[col], b[col], samples=samples,
                                                confidence=confidence, seed=seed)})
    return out


def find_effect(effects: Sequence[dict[str, Any]], effect: str, set_name: str,
                judge: str) -> dict[str, Any] | None:
    """The entry of :func:`paired_effects` for (effect, set, judge), or None."""
    return next((e for e in effects if (e["effect"], e["set"], e["judge"]) == (effect, set_name, judge)),
                None)

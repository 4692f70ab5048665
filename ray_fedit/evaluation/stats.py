"""Summary statistics of judge verdicts: rates and means with percentile-bootstrap intervals.

Pure numpy; no Ray, no torch. Every function takes an explicit seed, so the same verdicts always
give the same interval.

Percentile bootstrap (Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13):
draw ``B`` resamples of the ``n`` values with replacement, take the statistic (here the mean) of
each, and report the ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles of those ``B`` statistics as the
``c`` interval. A rate is the mean of 0/1 indicators, so the same code serves rates and means.

Unparseable judge outputs (verdict ``None``) are never counted as safe: a rate's numerator counts
only ``True``, its denominator counts every row, and the unparseable rows are reported separately.
This is the paper's convention for MD-Judge (safety rate = #"safe" / 520).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values``.

    Args:
        values: the observations (0/1 indicators for a rate, scores for a mean).
        samples: the number of bootstrap resamples ``B``.
        confidence: the interval's coverage, e.g. 0.95.
        seed: seed of the resampling generator.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when ``values`` is empty.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    # Resample in chunks so memory stays bounded at B x n for large benchmarks.
    chunk = max(1, min(samples, 4_000_000 // x.size))
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def rate_summary(
    verdicts: Sequence[bool | None],
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """Share of ``True`` verdicts with a bootstrap CI; ``None`` (unparseable) is not ``True``.

    Returns:
        ``{"rate", "ci_low", "ci_high", "n", "n_true", "unparseable"}``; ``rate`` and the interval
        are ``None`` when there are no verdicts.
    """
    n = len(verdicts)
    hits = np.array([v is True for v in verdicts], dtype=np.float64)
    low, high = bootstrap_ci(hits, samples=samples, confidence=confidence, seed=seed)
    return {
        "rate": float(hits.mean()) if n else None,
        "ci_low": low if n else None,
        "ci_high": high if n else None,
        "n": n,
        "n_true": int(hits.sum()),
        "unparseable": sum(v is None for v in verdicts),
    }


def mean_summary(
    scores: Sequence[float | None],
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """Mean of the parsed scores (``None`` = unparseable, left out), with a bootstrap CI.

    Returns:
        ``{"mean", "ci_low", "ci_high", "n", "unparseable"}``; ``n`` counts parsed scores only, and
        ``mean`` and the interval are ``None`` when nothing parsed.
    """
    parsed = np.array([s for s in scores if s is not None], dtype=np.float64)
    low, high = bootstrap_ci(parsed, samples=samples, confidence=confidence, seed=seed)
    ok = parsed.size > 0
    return {
        "mean": float(parsed.mean()) if ok else None,
        "ci_low": low if ok else None,
        "ci_high": high if ok else None,
        "n": int(parsed.size),
        "unparseable": len(scores) - int(parsed.size),
    }


def by_category(
    values: Sequence[Any],
    categories: Sequence[str],
    summarize: Any,
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Apply ``summarize`` (:func:`rate_summary` or :func:`mean_summary`) within each category.

    Each category gets its own seed, derived from ``seed`` and a CRC-32 of the category name (stable
    across processes, unlike ``hash``), so rows added to one category leave the others' intervals
    unchanged.
    """
    groups: dict[str, list[Any]] = {}
    for v, c in zip(values, categories, strict=True):
        groups.setdefault(c, []).append(v)
    out = {}
    for cat in sorted(groups):
        keys = [seed, zlib.crc32(cat.encode())]
        sub_seed = int(np.random.SeedSequence(keys).generate_state(1)[0])
        out[cat] = summarize(groups[cat], samples=samples, confidence=confidence, seed=sub_seed)
    return out


def agreement(predicted: Sequence[bool], labels: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, confusion matrix, precision, recall and Cohen's kappa of binary predictions.

    The positive class is ``True`` (a refusal, a safe verdict). Between two judges (neither a
    reference) accuracy and kappa are symmetric; precision and recall take ``labels`` as the
    reference. Precision/recall are None when undefined (no positives), kappa when chance
    agreement is 1 (both constant and equal).
    """
    tp = sum(p and y for p, y in zip(predicted, labels, strict=True))
    fp = sum(p and not y for p, y in zip(predicted, labels, strict=True))
    fn = sum(not p and y for p, y in zip(predicted, labels, strict=True))
    n = len(labels)
    tn = n - tp - fp - fn
    acc = (tp + tn) / n if n else None
    # Chance agreement from the marginals (Cohen 1960).
    chance = (((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n)) if n else 1.0
    return {
        "n": n, "accuracy": acc,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "cohen_kappa": (acc - chance) / (1 - chance) if acc is not None and chance < 1 else None,
    }


def _first_sentence(text: str) -> str:
    """The text up to its first ``.``, ``!`` or ``?``, lower-cased and white-space folded."""
    folded = " ".join(text.split()).lower()
    end = min((i for i in (folded.find(c) for c in ".!?") if i >= 0), default=len(folded) - 1)
    return folded[:end + 1]


OPENING_WORDS = 6


def response_diversity(responses: Sequence[str]) -> dict[str, Any]:
    """How repetitive a model's responses are: a defense that teaches one sentence shows here.

    Responses compare after folding white space and case. A memorised refusal often varies at its
    end ("... designed to assist users" / "... with lyrics"), so the opening (first
    :data:`OPENING_WORDS` words) is counted too.

    Returns:
        ``{"n", "top_share", "top_response", "distinct", "distinct_first_sentences",
        "top_first_sentence_share", "top_opening_share", "top_opening"}``: the share of the most
        frequent response (first of the most frequent in input order on ties), the number of
        distinct responses and first sentences, and the shares of the most frequent first sentence
        and opening. Shares are None when ``responses`` is empty.
    """
    from collections import Counter

    folded = [" ".join(r.split()).lower() for r in responses]
    n = len(folded)
    if not n:
        return {"n": 0, "top_share": None, "top_response": None, "distinct": 0,
                "distinct_first_sentences": 0, "top_first_sentence_share": None,
                "top_opening_share": None, "top_opening": None}
    counts = Counter(folded)
    top = max(counts.values())
    top_response = next(r for r in responses if counts[" ".join(r.split()).lower()] == top)
    firsts = Counter(_first_sentence(r) for r in responses)
    openings = Counter(" ".join(r.split()[:OPENING_WORDS]) for r in folded)
    opening, opening_count = openings.most_common(1)[0]
    return {"n": n, "top_share": top / n, "top_response": top_response, "distinct": len(counts),
            "distinct_first_sentences": len(firsts),
            "top_first_sentence_share": max(firsts.values()) / n,
            "top_opening_share": opening_count / n, "top_opening": opening}


def paired_difference(before: Sequence[bool | None], after: Sequence[bool | None], *,
                      samples: int, confidence: float, seed: int) -> dict[str, Any]:
    """``after - before`` of two rates on the same items, with a paired bootstrap interval.

    Items are resampled as pairs, so the interval reflects the per-item change (the same prompts
    answered by two models), not two independent samples. None (unparseable) is not ``True``.

    Returns:
        ``{"diff", "ci_low", "ci_high", "n", "changed"}``: ``changed`` counts items whose verdict
        differs; the interval is None when there are no items.

    Raises:
        ValueError: if the two sequences differ in length.
    """
    if len(before) != len(after):
        raise ValueError(f"paired rates need the same items: {len(before)} vs {len(after)}")
    d = (np.array([v is True for v in after], dtype=np.float64)
         - np.array([v is True for v in before], dtype=np.float64))
    n = int(d.size)
    low, high = bootstrap_ci(d, samples=samples, confidence=confidence, seed=seed)
    return {"diff": float(d.mean()) if n else None, "ci_low": low if n else None,
            "ci_high": high if n else None, "n": n, "changed": int(np.count_nonzero(d))}


def judge_agreement(verdicts: dict[str, Sequence[bool | None]]) -> dict[str, dict[str, Any]]:
    """Pairwise agreement of binary judges on the same items: ``{"a|b": {...}}``, in input order.

    A judge with no verdict at all (a scoring judge) is left out; within a pair, items that either
    judge could not parse are left out.

    Returns:
        Per pair ``{"n", "agree", "cohen_kappa", "both_true", "only_first", "only_second"}``.
    """
    names = [j for j, v in verdicts.items() if any(x is not None for x in v)]
    out: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pairs = [(x, y) for x, y in zip(verdicts[a], verdicts[b], strict=True)
                     if x is not None and y is not None]
            stats = agreement([bool(x) for x, _ in pairs], [bool(y) for _, y in pairs])
            c = stats["confusion"]
            out[f"{a}|{b}"] = {"n": stats["n"], "agree": stats["accuracy"],
                               "cohen_kappa": stats["cohen_kappa"], "both_true": c["tp"],
                               "only_first": c["fp"], "only_second": c["fn"]}
    return out

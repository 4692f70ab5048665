"""What the terminal shows of evaluations: one-line headlines, the stage table, the paired effects.

Shared by the pipeline (after each evaluation and at the end of a run), ``ray-fedit evaluate``,
the sweep trials (:func:`flat_headline` is what a trial reports to Tune) and the report.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ATTACKED, NO_ATTACK, DEFENDED = "attacked", "no_attack", "defended"
STAGE_LABELS = {"base": "base model (no FedIT)", NO_ATTACK: "FedIT, no attack",
                ATTACKED: "FedIT under attack", DEFENDED: "attacked + post-hoc defense"}
EFFECT_LABELS = {"attack": "attack effect (attacked - no attack)",
                 "defense": "defense gain (defended - attacked)"}


def collect_metrics(eval_root: Path) -> dict[str, dict[str, Any]]:
    """metrics.json of each evaluated stage (no_attack, attacked, defended, ...) by label."""
    out = {}
    if Path(eval_root).is_dir():
        for path in sorted(Path(eval_root).glob("*/metrics.json")):
            out[path.parent.name] = json.loads(path.read_text())
    return out


def first_benchmark(metrics: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(name, block) of the first benchmark with a verdict judge (a safety rate)."""
    for bench, per_bench in (metrics.get("safety") or {}).items():
        if any(b.get("rate") is not None for b in (per_bench.get("judges") or {}).values()):
            return bench, per_bench
    return None


def judge_order(blocks: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    """The judges of ``blocks`` in the config's order: metrics.json is written with sorted keys,
    and its ``judges`` list keeps the configured order."""
    order = [j for j in metrics.get("judges") or [] if j in blocks]
    return order + [j for j in blocks if j not in order]


def safety_rates(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{judge: rate block}`` of the first benchmark, for the verdict judges, in config order."""
    first = first_benchmark(metrics)
    if first is None:
        return {}
    blocks = first[1]["judges"]
    return {j: blocks[j] for j in judge_order(blocks, metrics) if blocks[j].get("rate") is not None}


def benign_refusals(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{judge: benign refusal rate block}``: the rule's, then every other refusal judge's."""
    benign = (metrics.get("helpfulness") or {}).get("benign") or {}
    if "refusal_rate" not in benign:
        return {}
    return {"rule": benign["refusal_rate"], **(benign.get("refusal_rate_by_judge") or {})}


def _pct(block: Mapping[str, Any], key: str = "rate") -> str:
    return f"{100 * block[key]:.1f}%"


def _ci(block: Mapping[str, Any], key: str = "rate", *, width: bool = True) -> str:
    if not width:
        return f"{100 * block[key]:.1f}% [{100 * block['ci_low']:.1f}, {100 * block['ci_high']:.1f}]"
    return f"{100 * block[key]:5.1f}% [{100 * block['ci_low']:4.1f},{100 * block['ci_high']:5.1f}]"


def headline(metrics: Mapping[str, Any]) -> str:
    """``advbench safety: rule 12.5% [..] n=48, probe ...; benign refusal rule 0.0%, ...; NLL``."""
    parts = []
    first = first_benchmark(metrics)
    rates = safety_rates(metrics)
    if first and rates:
        n = next(iter(rates.values()))["n"]
        parts.append(f"{first[0]} safety (n={n}): " + ", ".join(
            f"{j} {_ci(b, width=False)}" for j, b in rates.items()))
    refusals = benign_refusals(metrics)
    if refusals:
        parts.append("benign refusal: " + ", ".join(f"{j} {_pct(b)}" for j, b in refusals.items()))
    benign = (metrics.get("helpfulness") or {}).get("benign") or {}
    if "response_nll" in benign:
        parts.append(f"benign NLL {benign['response_nll']['mean']:.3f}")
    return "; ".join(parts)


def flat_headline(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalars a sweep trial reports: ``safety_rate`` (first judge), ``safety_rate.<judge>``,
    ``benign_refusal_rate`` (rule), ``benign_refusal_rate.<judge>``, ``benign_nll``, and
    ``top_response_share`` (of the first benchmark)."""
    out: dict[str, float] = {}
    rates = safety_rates(metrics)
    for i, (judge, block) in enumerate(rates.items()):
        if i == 0:
            out["safety_rate"] = block["rate"]
        out[f"safety_rate.{judge}"] = block["rate"]
    for judge, block in benign_refusals(metrics).items():
        if judge == "rule":
            out["benign_refusal_rate"] = block["rate"]
        out[f"benign_refusal_rate.{judge}"] = block["rate"]
    benign = (metrics.get("helpfulness") or {}).get("benign") or {}
    if "response_nll" in benign:
        out["benign_nll"] = benign["response_nll"]["mean"]
    first = first_benchmark(metrics)
    share = ((first[1].get("diversity") or {}).get("top_share") if first else None)
    if share is not None:
        out["top_response_share"] = share
    return out


def summary_table(metrics: Mapping[str, Mapping[str, Any]],
                  effects: Sequence[Mapping[str, Any]] = ()) -> str:
    """The stages as rows: safety per verdict judge with CIs, benign refusal per judge, the shares
    of the most frequent response and opening; then the paired effects of
    :mod:`ray_fedit.evaluation.paired`."""
    order = ["base", NO_ATTACK, ATTACKED, DEFENDED]
    stages = [s for s in order if s in metrics] + sorted(s for s in metrics if s not in order)
    judges: list[str] = []
    refusal_judges: list[str] = []
    for s in stages:
        judges += [j for j in safety_rates(metrics[s]) if j not in judges]
        refusal_judges += [j for j in benign_refusals(metrics[s]) if j not in refusal_judges]
    first = next((fb for s in stages if (fb := first_benchmark(metrics[s]))), None)
    bench = first[0] if first else "safety"
    header = f"{'':30}" + "".join(f" {bench + ' ' + j + ' safe':>22}" for j in judges)
    header += "".join(f" {'benign refusal ' + j:>20}" for j in refusal_judges)
    header += f" {'top resp.':>9} {'top opening':>11}"
    lines = [header]
    for s in stages:
        rates = safety_rates(metrics[s])
        refusals = benign_refusals(metrics[s])
        row = f"{STAGE_LABELS.get(s, s):30}"
        row += "".join(f" {_ci(rates[j]) if j in rates else '-':>22}" for j in judges)
        row += "".join(f" {_pct(refusals[j]) if j in refusals else '-':>20}" for j in refusal_judges)
        fb = first_benchmark(metrics[s])
        diversity = (fb[1].get("diversity") or {}) if fb else {}
        for key, width in (("top_share", 9), ("top_opening_share", 11)):
            share = diversity.get(key)
            row += f" {'-' if share is None else f'{100 * share:.0f}%':>{width}}"
        lines.append(row)
    shown = [e for e in effects if e["set"] in (bench, "benign")]
    if shown:
        lines += ["", "paired over the same prompts (95% bootstrap CI), in points:"]
        for name, label in EFFECT_LABELS.items():
            sub = [e for e in shown if e["effect"] == name]
            if not sub:
                continue
            lines.append(f"  {label}:")
            for e in sub:
                what = f"{e['set']} {'refusal' if e['metric'] == 'refusal' else 'safe'}, {e['judge']}"
                lines.append(f"    {what:30} {100 * e['diff']:+6.1f} [{100 * e['ci_low']:+6.1f}, "
                             f"{100 * e['ci_high']:+6.1f}]  ({e['changed']} of {e['n']} changed)")
    return "\n".join(lines)

"""Tables and plots of a run or sweep directory: ``ray-fedit report DIR``.

:func:`write_report` looks at ``DIR`` and dispatches:

- a **run directory** (it has ``resolved_config.yaml``; layout in :mod:`ray_fedit.rundir`) gets
  ``report/tables.md`` and ``report/table.csv`` shaped like the paper's Tables 1/2 (rows = base model,
  no attack, attacked, defended; columns = each benchmark x judge, with bootstrap CIs and n, and the
  helpfulness metrics), and PNG plots of the per-round client losses, the per-round evaluations, the
  aggregation weights (Fig. 3b), the pairwise cosine similarity of updates (Fig. 3a), and the
  defense-steps ablation (Fig. 6);
- a **sweep directory** (it has ``sweep.json``, written by :func:`ray_fedit.sweeps.run_sweep`) gets
  ``sweep_results.csv`` (one row per trial), ``report/sweep_summary.md`` and ``.csv`` (mean and a
  t-interval across seeds per grid point, with tables shaped like the paper's Tables 7 and 3), and a
  plot of safety vs. malicious fraction per aggregator.

Everything is read from files: no Ray, no torch. Missing optional inputs (no round evaluations, no
``pairwise_cosine``, no defense-step evaluations, failed sweep trials) skip the matching output and
leave a note in the Markdown file. docs/report.md describes every output.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ray_fedit.errors import DataError
from ray_fedit.evaluation.paired import find_effect, paired_effects
from ray_fedit.evaluation.summary import flat_headline, judge_order
from ray_fedit.report_html import write_html

REPORT_DIR = "report"
RUN_MARKER = "resolved_config.yaml"
SWEEP_MARKER = "sweep.json"  # ray_fedit.sweeps.SWEEP_STATE; not imported, to keep this module light
SWEEP_RESULTS = "sweep_results.csv"
DEFAULT_METRIC = "attacked.safety_rate"

MAIN_STAGES = ("base", "no_attack", "attacked", "defended")
ROUND_STAGE = re.compile(r"^round_(\d+)$")
STEP_STAGE = re.compile(r"^defended_step_(\d+)$")

# Display names in the paper's tables; a rule missing here is shown by its registry name.
AGGREGATOR_LABELS = {
    "mean": "FedAvg", "median": "Median", "trimmed_mean": "Trimmedmean", "krum": "Krum",
    "multi_krum": "Multi-Krum", "dnc": "DnC", "foolsgold": "FoolsGold", "residual": "Residual",
    "bulyan": "Bulyan", "geometric_median": "Geometric median",
    "centered_clipping": "Centered clipping", "norm_clip": "Norm clipping",
}
JUDGE_LABELS = {"rule": "Rule", "reward_model": "RM", "llm_judge_http": "LLM-judge refusal",
                "probe": "Probe"}

BENIGN_COLOR, MALICIOUS_COLOR = "tab:blue", "tab:red"
RC = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
      "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.grid": True, "grid.alpha": 0.3}


# ============================================================================ entry points
def write_report(directory: Path) -> list[Path]:
    """Write the report of a run or sweep directory into ``<directory>/report/``.

    Args:
        directory: a run directory (with ``resolved_config.yaml``) or a sweep directory (with
            ``sweep.json``). A sweep directory is reported from Tune's per-trial ``result.json``
            files, an earlier ``sweep_results.csv`` and the trials' run directories.

    Returns:
        The files written.

    Raises:
        DataError: when ``directory`` does not exist or is neither kind of directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory; expected a run directory (with "
                        f"{RUN_MARKER}) or a sweep directory (with {SWEEP_MARKER})")
    if (directory / RUN_MARKER).is_file():
        return write_run_report(directory)
    if (directory / SWEEP_MARKER).is_file():
        return write_sweep_report(directory)
    raise DataError(f"{directory}: neither a run directory (no {RUN_MARKER}) nor a sweep directory "
                    f"(no {SWEEP_MARKER}); pass runs/<name>/<timestamp> or runs/sweeps/<name>")


def _announce(where: Path, paths: Sequence[Path]) -> None:
    print(f"report: {len(paths)} files in {where}", flush=True)
    for p in paths:
        print(f"  {p}", flush=True)


# ============================================================================ metric blocks
@dataclass(frozen=True)
class Stat:
    """One summarised number with its interval, in the units of metrics.json (rates as fractions)."""

    value: float
    low: float | None = None
    high: float | None = None
    n: int | None = None
    unparseable: int | None = None


def _num(x: Any) -> float | None:
    """A finite float, or None (JSON null, NaN, strings)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    return float(x) if math.isfinite(x) else None


def _dig(data: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


@dataclass(frozen=True)
class Column:
    """One metric column of the run table, read from a metrics.json block.

    Attributes:
        key: the CSV column (``advbench.rule.safe_pct``); ``_pct`` columns hold percentages.
        label: the Markdown header.
        kind: ``safety`` (rate judges), ``score`` (scoring judges) or ``helpfulness``.
        path: the keys from the top of metrics.json to the block.
        value_key: ``rate`` or ``mean``.
        percent: show the value (and CI) x 100.
        digits: decimals shown.
    """

    key: str
    label: str
    kind: str
    path: tuple[str, ...]
    value_key: str
    percent: bool
    digits: int

    def get(self, metrics: Mapping[str, Any]) -> Stat | None:
        block = _dig(metrics, self.path)
        if not isinstance(block, Mapping):
            return None
        value = _num(block.get(self.value_key))
        if value is None:
            return None
        n = block.get("n")
        bad = block.get("unparseable")
        return Stat(value, _num(block.get("ci_low")), _num(block.get("ci_high")),
                    n if isinstance(n, int) else None, bad if isinstance(bad, int) else None)

    @property
    def short(self) -> str:
        """The label without units and direction arrows (``advbench Rule``), for prose and legends."""
        return self.label.replace(" (%)", "").rstrip(" ↑↓")

    def scale(self, x: float | None) -> float | None:
        return None if x is None else (100.0 * x if self.percent else x)

    def cell(self, stat: Stat | None, *, with_n: bool = True) -> str:
        """``49.8 [45.1, 54.2] n=64`` (or ``-`` when the stage lacks this metric)."""
        if stat is None:
            return "-"
        text = f"{self.scale(stat.value):.{self.digits}f}"
        if stat.low is not None and stat.high is not None:
            text += f" [{self.scale(stat.low):.{self.digits}f}, {self.scale(stat.high):.{self.digits}f}]"
        if with_n and stat.n is not None:
            text += f" n={stat.n}"
        return text


def judge_label(judge: str, config: Mapping[str, Any]) -> str:
    """The paper's name of a judge (``judge_model`` is MD-Judge or Llama Guard by its format)."""
    if judge == "judge_model":
        fmt = _dig(config, ("evaluation", "judge_format"))
        return "Llama Guard" if fmt == "llama_guard" else "MD-Judge"
    return JUDGE_LABELS.get(judge, judge)


def metric_columns(metrics: Iterable[Mapping[str, Any]], config: Mapping[str, Any]) -> list[Column]:
    """The columns that any of ``metrics`` fills, in the order they first appear.

    Safety: per benchmark and judge a rate column (judges whose rows carry ``safe``) and a score
    column (judges with a ``score`` block, e.g. the reward model). Helpfulness: benign refusal rate,
    benign response NLL, MT-1.
    """
    cols: dict[str, Column] = {}
    helpful: dict[str, Column] = {}
    diversity: dict[str, Column] = {}
    for m in metrics:
        for bench, per_bench in (m.get("safety") or {}).items():
            blocks = (per_bench or {}).get("judges") or {}
            for judge, block in ((j, blocks[j]) for j in judge_order(blocks, m)):
                name = f"{bench} {judge_label(judge, config)}"
                base = ("safety", bench, "judges", judge)
                if isinstance(block, Mapping) and "rate" in block:
                    cols.setdefault(f"{bench}.{judge}.safe_pct", Column(
                        f"{bench}.{judge}.safe_pct", f"{name} (%) ↑", "safety", base, "rate", True, 1))
                if isinstance(block, Mapping) and isinstance(block.get("score"), Mapping):
                    # The reward model scores higher for safer answers; the StrongREJECT score of
                    # llm_judge_http is 0 for harmless and 1 for fully harmful answers.
                    label = (f"{bench} StrongREJECT score ↓" if judge == "llm_judge_http"
                             else f"{name} score ↑")
                    cols.setdefault(f"{bench}.{judge}.score", Column(
                        f"{bench}.{judge}.score", label, "score", (*base, "score"), "mean", False, 2))
            if isinstance((per_bench or {}).get("diversity"), Mapping):
                for key, what in (("top_share", "response"), ("top_opening_share", "opening")):
                    diversity.setdefault(f"{bench}.top_{what}_pct", Column(
                        f"{bench}.top_{what}_pct", f"{bench} top {what} (%) ↓", "diversity",
                        ("safety", bench, "diversity"), key, True, 1))
        help_block = m.get("helpfulness") or {}
        if "refusal_rate" in (help_block.get("benign") or {}):
            helpful.setdefault("benign.refusal_pct", Column(
                "benign.refusal_pct", "Benign refusal (%) ↓", "helpfulness",
                ("helpfulness", "benign", "refusal_rate"), "rate", True, 1))
        for judge in (help_block.get("benign") or {}).get("refusal_rate_by_judge") or {}:
            helpful.setdefault(f"benign.{judge}.refusal_pct", Column(
                f"benign.{judge}.refusal_pct", f"Benign refusal {judge_label(judge, config)} (%) ↓",
                "helpfulness", ("helpfulness", "benign", "refusal_rate_by_judge", judge), "rate",
                True, 1))
        if "response_nll" in (help_block.get("benign") or {}):
            helpful.setdefault("benign.nll", Column(
                "benign.nll", "Benign NLL ↓", "helpfulness", ("helpfulness", "benign", "response_nll"),
                "mean", False, 3))
        if isinstance(help_block.get("mt1"), Mapping):
            helpful.setdefault("mt1", Column("mt1", "MT-1 ↑", "helpfulness", ("helpfulness", "mt1"),
                                             "mean", False, 2))
    refusal = ["benign.refusal_pct"] + sorted(k for k in helpful if k.endswith(".refusal_pct")
                                              and k != "benign.refusal_pct")
    order = [*refusal, "benign.nll", "mt1"]
    return (list(cols.values()) + [helpful[k] for k in order if k in helpful]
            + list(diversity.values()))


# ============================================================================ run directory
@dataclass
class RunData:
    """What a run directory holds, read tolerantly (missing or broken files become notes)."""

    root: Path
    config: dict[str, Any]
    manifest: dict[str, Any]
    rounds: list[dict[str, Any]]
    no_attack_rounds: list[dict[str, Any]]
    metrics: dict[str, dict[str, Any]]            # eval/<stage>/metrics.json by stage
    no_attack_round_metrics: dict[int, dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def aggregator(self) -> str:
        name = str(_dig(self.config, ("aggregator", "name")) or "mean")
        return AGGREGATOR_LABELS.get(name, name)

    @property
    def malicious_ids(self) -> set[int]:
        ids = self.manifest.get("malicious_ids")
        if isinstance(ids, list):
            return {int(i) for i in ids}
        # Older or partial manifests: fall back to the flags in the round records.
        return {c["id"] for r in self.rounds for c in r.get("clients", []) if c.get("malicious")}

    def round_metrics(self) -> dict[int, dict[str, Any]]:
        """Evaluations every N rounds: ``eval/round_XXXX`` dirs, else the rounds' ``eval`` fields."""
        out = {int(r["round"]): r["eval"] for r in self.rounds
               if isinstance(r.get("eval"), Mapping) and r["eval"].get("safety") is not None}
        for stage, m in self.metrics.items():
            match = ROUND_STAGE.match(stage)
            if match:
                out[int(match.group(1))] = m
        return dict(sorted(out.items()))

    def step_metrics(self) -> dict[int, dict[str, Any]]:
        """Evaluations of the defense's intermediate adapters (``eval/defended_step_XXXX``)."""
        out = {int(m.group(1)): v for s, v in self.metrics.items() if (m := STEP_STAGE.match(s))}
        return dict(sorted(out.items()))


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"`{path}` could not be read ({e}); skipped.")
        return None
    if not isinstance(data, dict):
        notes.append(f"`{path}` is not a JSON object; skipped.")
        return None
    return data


def read_rounds(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The records of ``rounds.jsonl``, one per round (the last line wins after a resume).

    A line that is not JSON (a run killed mid-write) is skipped with a note naming ``file:line``.
    """
    if not path.is_file():
        return []
    by_round: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            by_round[int(rec["round"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            notes.append(f"`{path}:{i}` is not a round record; skipped.")
    return [by_round[k] for k in sorted(by_round)]


def _eval_metrics(eval_root: Path, notes: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    if eval_root.is_dir():
        for path in sorted(eval_root.glob("*/metrics.json")):
            data = _read_json(path, notes)
            if data is not None:
                out[path.parent.name] = data
    return out


def load_run(root: Path) -> RunData:
    """Read a run directory (see :mod:`ray_fedit.rundir`) for reporting."""
    notes: list[str] = []
    try:
        config = yaml.safe_load((root / RUN_MARKER).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{root / RUN_MARKER}: not a readable YAML config ({e})") from None
    manifest = {}
    if (root / "manifest.json").is_file():
        manifest = _read_json(root / "manifest.json", notes) or {}
    no_attack_evals = _eval_metrics(root / "no_attack" / "eval", notes)
    return RunData(
        root=root, config=config if isinstance(config, dict) else {}, manifest=manifest,
        rounds=read_rounds(root / "rounds.jsonl", notes),
        no_attack_rounds=read_rounds(root / "no_attack" / "rounds.jsonl", notes),
        metrics=_eval_metrics(root / "eval", notes),
        no_attack_round_metrics={int(m.group(1)): v for s, v in no_attack_evals.items()
                                 if (m := ROUND_STAGE.match(s))},
        notes=notes,
    )


def defense_short(config: Mapping[str, Any]) -> str:
    """``post-hoc, Level 2`` for plot titles."""
    name = _dig(config, ("defense", "name")) or "posthoc"
    level = _dig(config, ("defense", "level"))
    return {"posthoc": "post-hoc"}.get(name, name) + (f", Level {level}" if level is not None else "")


def defense_label(config: Mapping[str, Any]) -> str:
    name = _dig(config, ("defense", "name")) or "posthoc"
    level = _dig(config, ("defense", "level"))
    what = {"posthoc": "Post-hoc defense", "pretrained": "Pretrained defense (Local+Gen)"}.get(
        name, f"{name} defense")
    return f"+ {what}" + (f" (Level {level})" if level is not None else "")


def stage_label(stage: str, run: RunData) -> str:
    """Row name of a stage, as in the paper's tables."""
    if stage == "base":
        return "Base model"
    if stage == "no_attack":
        return f"{run.aggregator} (No Attack)"
    if stage == "attacked":
        return f"{run.aggregator} (attacked)"
    if stage == "defended":
        return defense_label(run.config)
    if m := ROUND_STAGE.match(stage):
        return f"{run.aggregator} (attacked), round {int(m.group(1))}"
    if m := STEP_STAGE.match(stage):
        return f"{defense_label(run.config)}, step {int(m.group(1))}"
    return stage


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def _run_rows(run: RunData) -> list[tuple[str, str, dict[str, Any]]]:
    """(stage, label, metrics) of the table rows: main stages, other stages, rounds, defense steps."""
    stages = [s for s in MAIN_STAGES if s in run.metrics]
    stages += sorted(s for s in run.metrics if s not in MAIN_STAGES and not ROUND_STAGE.match(s)
                     and not STEP_STAGE.match(s))
    rows = [(s, stage_label(s, run), run.metrics[s]) for s in stages]
    rows += [(f"round_{r:04d}", stage_label(f"round_{r:04d}", run), m)
             for r, m in run.round_metrics().items()]
    rows += [(f"defended_step_{k:04d}", stage_label(f"defended_step_{k:04d}", run), m)
             for k, m in run.step_metrics().items()]
    return rows


def _config_summary(run: RunData) -> list[str]:
    cfg = run.config
    fed = cfg.get("federation") or {}
    attack = cfg.get("attack") or {}
    defense = cfg.get("defense") or {}
    mal = sorted(run.malicious_ids)
    items = [
        ("model", _dig(cfg, ("model", "name"))),
        ("aggregator", f"{run.aggregator} (`{_dig(cfg, ('aggregator', 'name'))}`)"),
        ("clients", f"{fed.get('num_clients')} ({fed.get('clients_per_round')} per round), "
                    f"{fed.get('rounds')} rounds"),
        ("malicious", f"fraction {attack.get('malicious_fraction')}, ids {mal}; update attack "
                      f"`{_dig(attack, ('update', 'name')) or 'none'}`"),
        ("defense", f"`{defense.get('name')}` level {defense.get('level')}, {defense.get('steps')} steps"
         if defense.get("name") not in (None, "none") else "none"),
        ("seed", cfg.get("seed")),
    ]
    return [f"- {k}: {v}" for k, v in items]


def _effect_of(col: Column, effects: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    """The paired effect behind a rate column (``advbench.probe.safe_pct``, ``benign.refusal_pct``)."""
    parts = col.key.split(".")
    if col.key == "benign.refusal_pct":
        set_name, judge = "benign", "rule"
    elif len(parts) == 3 and parts[2] in ("safe_pct", "refusal_pct"):
        set_name, judge = parts[0], parts[1]
    else:
        return None
    return find_effect(effects, name, set_name, judge)


def _differences(run: RunData, cols: Sequence[Column],
                 effects: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """Attack effect (attacked - no attack) and defense gain (defended - attacked), in points,
    with the paired interval over the same prompts where the per-prompt verdicts are there."""
    pairs = [("Attack effect (attacked − no attack)", "no_attack", "attacked", "attack"),
             ("Defense gain (defended − attacked)", "attacked", "defended", "defense")]
    out = []
    for title, a, b, name in pairs:
        if a not in run.metrics or b not in run.metrics:
            continue
        parts = []
        for c in cols:
            sa, sb = c.get(run.metrics[a]), c.get(run.metrics[b])
            if sa is not None and sb is not None:
                diff = c.scale(sb.value) - c.scale(sa.value)  # type: ignore[operator]
                text = f"{c.short} {diff:+.{c.digits}f}{' points' if c.percent else ''}"
                e = _effect_of(c, effects, name)
                if e is not None and e["ci_low"] is not None:
                    text += (f" [{100 * e['ci_low']:+.1f}, {100 * e['ci_high']:+.1f}] paired, "
                             f"{e['changed']}/{e['n']} prompts changed")
                parts.append(text)
        if parts:
            out.append(f"- {title}: " + "; ".join(parts))
    return out


def fallback_notes(rounds: Sequence[Mapping[str, Any]], label: str) -> list[str]:
    """Say where a federation's rule or attack fell back to something simpler, round by round.

    Reads ``aggregator_info.fallback`` (a rule that became the mean or the zero update) and
    ``update_attack.applied == false`` (an update attack without enough reference updates, whose
    attackers sent their trained updates) from the round records.
    """
    by_reason: dict[str, list[int]] = {}
    for r in rounds:
        reason = _dig(r, ("aggregator_info", "fallback"))
        if reason:
            by_reason.setdefault(f"the aggregation rule fell back: {reason}", []).append(r["round"])
        attack = r.get("update_attack") or {}
        if attack.get("applied") is False and attack.get("reason"):
            by_reason.setdefault(f"the update attack was not applied ({attack['reason']}); its "
                                 "attackers sent their trained updates", []).append(r["round"])
    return [f"{label}: in {len(rs)} of {len(rounds)} rounds ({', '.join(map(str, rs))}) {why}."
            for why, rs in by_reason.items()]


def write_run_report(root: Path) -> list[Path]:
    """Tables and plots of one run directory into ``<root>/report/``.

    Returns:
        The files written: ``tables.md``, ``table.csv`` and the PNG plots whose data exist.
    """
    import pandas as pd

    root = Path(root)
    run = load_run(root)
    out = root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    notes = list(run.notes)
    notes += fallback_notes(run.rounds, "FedIT under attack")
    notes += fallback_notes(run.no_attack_rounds, "FedIT, no attack")
    rows = _run_rows(run)
    cols = metric_columns([m for _, _, m in rows], run.config)

    # ---- the CSV: one row per evaluated stage, values in display units (_pct = percent)
    records = []
    for stage, label, m in rows:
        rec: dict[str, Any] = {"stage": stage, "method": label}
        for c in cols:
            s = c.get(m)
            rec[c.key] = c.scale(s.value) if s else None
            rec[f"{c.key}.ci_low"] = c.scale(s.low) if s else None
            rec[f"{c.key}.ci_high"] = c.scale(s.high) if s else None
            rec[f"{c.key}.n"] = s.n if s else None
            rec[f"{c.key}.unparseable"] = s.unparseable if s else None
        records.append(rec)
    csv_path = out / "table.csv"
    header = ["stage", "method"] + [f"{c.key}{suffix}" for c in cols
                                    for suffix in ("", ".ci_low", ".ci_high", ".n", ".unparseable")]
    pd.DataFrame(records, columns=header).to_csv(csv_path, index=False)

    # ---- the plots
    plots: list[tuple[Path, str]] = []
    for fn in (plot_losses, plot_round_metrics, plot_weights, plot_pairwise_cosine,
               plot_defense_steps, plot_defense_loss):
        result = fn(run, out, cols)
        if isinstance(result, Path):
            plots.append((result, (fn.__doc__ or "").strip().splitlines()[0].rstrip(".")))
        else:
            notes.append(result)

    # ---- the Markdown
    conf = _dig(next((m for _, _, m in rows), {}), ("confidence",))
    conf_txt = f"{100 * conf:.0f}%" if isinstance(conf, (int, float)) else "bootstrap"
    md = [f"# Report of `{root}`", "", *_config_summary(run), ""]
    main = [(s, label, m) for s, label, m in rows if not ROUND_STAGE.match(s) and not STEP_STAGE.match(s)]
    if main:
        md += ["## Safety and helpfulness (paper Tables 1/2)", "",
               f"Cells: value [{conf_txt} percentile-bootstrap CI] n=prompts. Rates in %. "
               "↑ higher is better, ↓ lower is better.", ""]
        md += _md_table(["Method", *(c.label for c in cols)],
                        [[label, *(c.cell(c.get(m)) for c in cols)] for _, label, m in main])
        effects = paired_effects(root / "eval", samples=int(_dig(main[0][2], ("bootstrap_samples",))
                                                            or 1000),
                                 confidence=float(conf) if isinstance(conf, (int, float)) else 0.95)
        diffs = _differences(run, cols, effects)
        if diffs:
            md += ["", *diffs]
        bad = [f"{label}: {c.short} {s.unparseable}" for _, label, m in main for c in cols
               if (s := c.get(m)) is not None and s.unparseable]
        if bad:
            md += ["", "Unparseable judge outputs (never counted as safe): " + "; ".join(bad) + "."]
    else:
        notes.append("No evaluated stage (`eval/<stage>/metrics.json`); run the `evaluate` stage "
                     "to fill the table.")
    for title, pattern in (("Evaluations every N rounds", ROUND_STAGE),
                           ("Defense steps (paper Fig. 6)", STEP_STAGE)):
        sub = [(s, label, m) for s, label, m in rows if pattern.match(s)]
        if sub:
            md += ["", f"## {title}", ""]
            md += _md_table(["Stage", *(c.label for c in cols)],
                            [[label, *(c.cell(c.get(m)) for c in cols)] for _, label, m in sub])
    if plots:
        md += ["", "## Plots", ""]
        for path, desc in plots:
            md += [f"### {desc}", "", f"![{desc}]({path.name})", ""]
    if notes:
        md += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    md_path = out / "tables.md"
    md_path.write_text("\n".join(md).rstrip() + "\n")
    paths = [md_path, csv_path, *(p for p, _ in plots), write_html(md_path, f"ray-fedit: {root}")]
    _announce(out, paths)
    return paths


# ============================================================================ run plots
def _figure(ncols: int = 1, *, width: float = 6.4, height: float = 4.2) -> tuple[Any, Any]:
    """A pyplot-free Figure (no global backend state; PNGs render with Agg) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def _rc() -> Any:
    import matplotlib

    return matplotlib.rc_context(RC)


def _client_label(cid: int, malicious: set[int]) -> str:
    return f"client {cid} (M)" if cid in malicious else f"client {cid}"


def plot_losses(run: RunData, out: Path, cols: Sequence[Column]) -> Path | str:
    """Per-round local training loss of benign and malicious clients."""
    rounds = [r for r in run.rounds if r.get("clients")]
    if not rounds:
        return "Loss curves: skipped (no `rounds.jsonl` with client records)."
    mal = run.malicious_ids
    with _rc():
        fig, (ax,) = _figure(width=9.0)
        for kind, color, marker in (("benign", BENIGN_COLOR, "o"), ("malicious", MALICIOUS_COLOR, "x")):
            xs, ys, mean_x, mean_y = [], [], [], []
            for r in rounds:
                losses = [_num(c.get("loss")) for c in r["clients"]
                          if (c.get("malicious", c.get("id") in mal)) == (kind == "malicious")]
                losses = [v for v in losses if v is not None]
                xs += [r["round"]] * len(losses)
                ys += losses
                if losses:
                    mean_x.append(r["round"])
                    mean_y.append(float(np.mean(losses)))
            if ys:
                ax.scatter(xs, ys, s=14, color=color, marker=marker, alpha=0.35,
                           label=f"{kind} clients (each)")
                ax.plot(mean_x, mean_y, color=color, lw=2, label=f"{kind} clients (mean)")
        pts = [(r["round"], _num(r.get("mean_loss"))) for r in run.rounds]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), color="black", lw=1.5, ls="-.",
                    label="all aggregated clients (mean)")
        clean = [(r["round"], _num(r.get("mean_loss"))) for r in run.no_attack_rounds]
        clean = [(x, y) for x, y in clean if y is not None]
        if clean:
            ax.plot(*zip(*clean, strict=True), color="0.45", lw=1.5, ls="--", label="no-attack run (mean)")
        _integer_x(ax)
        ax.set_xlabel("Round")
        ax.set_ylabel("Local training loss (per response token)")
        ax.set_title(f"Client training loss per round ({run.aggregator}, attacked federation)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves stay visible
        return _save(fig, out / "loss.png")


Series = tuple[str, str, Mapping[int, Mapping[str, Any]]]  # (name, format like "-o", {x: metrics})


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _metrics_figure(cols: Sequence[Column], series: Sequence[Series], *, xlabel: str, title: str,
                    reference: tuple[str, Mapping[str, Any]] | None = None) -> Any:
    """Metrics vs. x: one panel with every safety rate (%), then one panel per other metric.

    Panels wrap at three per row. Bands are the CIs of metrics.json; ``reference`` = (name,
    metrics) draws each metric's value as a dotted horizontal line in the metric's color.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    palette = colormaps["tab10"]
    rates = [c for c in cols if c.kind == "safety"]
    groups = ([rates] if rates else []) + [[c] for c in cols if c.kind != "safety"]
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5.4 * ncols, 4.3 * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    for ax, group in zip(axes, groups, strict=False):
        for ci, c in enumerate(group):
            color = palette(ci % 10)
            for name, style, points in series:
                pts = [(x, s) for x, m in sorted(points.items()) if (s := c.get(m)) is not None]
                if not pts:
                    continue
                x = [p[0] for p in pts]
                ax.plot(x, [c.scale(p[1].value) for p in pts], style, color=color, lw=1.8,
                        label=c.short + (f" ({name})" if name else ""))
                if all(p[1].low is not None and p[1].high is not None for p in pts):
                    ax.fill_between(x, [c.scale(p[1].low) for p in pts],
                                    [c.scale(p[1].high) for p in pts], color=color, alpha=0.15)
            ref = c.get(reference[1]) if reference else None
            if reference and ref is not None:
                ax.axhline(c.scale(ref.value), color=color, ls=":", lw=1.5,
                           label=f"{c.short} ({reference[0]})")
        xs = {x for _, _, points in series for x in points}
        if len(xs) == 1:  # a lone point: give the axis a width so the tick sits mid-axis
            ax.set_xlim(min(xs) - 1, min(xs) + 1)
        if len(xs) <= 12:  # tick exactly the evaluated rounds or steps
            ax.set_xticks(sorted(xs))
        else:
            _integer_x(ax)
        ax.set_xlabel(xlabel)
        if group is rates:
            ax.set_ylabel("Safety rate (%) ↑")
            ax.set_ylim(-2, 102)
            ax.set_title("Safety (bands: bootstrap CI)")
        else:
            ax.set_ylabel(group[0].label)
            ax.set_title(group[0].short)
        ax.legend(loc="best")
    fig.suptitle(title)
    return fig


def plot_round_metrics(run: RunData, out: Path, cols: Sequence[Column]) -> Path | str:
    """Safety and helpfulness of the global adapter every N rounds."""
    attacked = run.round_metrics()
    if not attacked:
        return ("Per-round safety: skipped (no `eval/round_XXXX` evaluations; set "
                "`federation.eval_every` to evaluate every N rounds).")
    series: list[Series] = [("attacked" if run.no_attack_round_metrics else "", "-o", attacked)]
    if run.no_attack_round_metrics:
        series.append(("no attack", "--s", run.no_attack_round_metrics))
    used = metric_columns([*attacked.values(), *run.no_attack_round_metrics.values()], run.config)
    with _rc():
        fig = _metrics_figure(used, series, xlabel="Round",
                              title=f"Global adapter evaluated every N rounds ({run.aggregator})")
        return _save(fig, out / "round_metrics.png")


def plot_weights(run: RunData, out: Path, cols: Sequence[Column]) -> Path | str:
    """Aggregation weight of each client per round (paper Fig. 3b)."""
    rounds = [r for r in run.rounds if r.get("clients")]
    if not rounds or not any(_num(c.get("weight")) is not None for r in rounds for c in r["clients"]):
        return "Aggregation weights: skipped (no client `weight` in `rounds.jsonl`)."
    mal = run.malicious_ids
    n_clients = _dig(run.config, ("federation", "num_clients"))
    ids = sorted({int(c["id"]) for r in rounds for c in r["clients"]}
                 | set(range(n_clients if isinstance(n_clients, int) else 0)))
    row = {cid: i for i, cid in enumerate(ids)}
    last = max(int(r["round"]) for r in rounds)
    grid = np.full((len(ids), last), np.nan)
    share_x, share_w, share_n = [], [], []
    for r in rounds:
        ws = [(int(c["id"]), _num(c.get("weight"))) for c in r["clients"]]
        for cid, w in ws:
            if w is not None:
                grid[row[cid], int(r["round"]) - 1] = w
        total = sum(w for _, w in ws if w is not None)
        if ws and total > 0:
            share_x.append(int(r["round"]))
            share_w.append(100 * sum(w for c, w in ws if w is not None and c in mal) / total)
            share_n.append(100 * sum(c in mal for c, _ in ws) / len(ws))
    from matplotlib import colormaps

    with _rc():
        fig, (ax, ax2) = _figure(2, width=6.2, height=max(4.2, 0.32 * len(ids) + 1.5))
        cmap = colormaps["viridis"].with_extremes(bad="0.9")
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest",
                       extent=(0.5, last + 0.5, len(ids) - 0.5, -0.5))
        fig.colorbar(im, ax=ax, label="aggregation weight")
        ax.set_yticks(range(len(ids)), labels=[_client_label(c, mal) for c in ids])
        for tick, cid in zip(ax.get_yticklabels(), ids, strict=True):
            tick.set_color(MALICIOUS_COLOR if cid in mal else "black")
        ax.grid(False)
        _integer_x(ax)
        ax.set_xlabel("Round")
        ax.set_ylabel("Client ((M) = malicious, red)")
        ax.set_title(f"Aggregation weights ({run.aggregator}); grey = not aggregated")
        if share_x:
            ax2.plot(share_x, share_w, color=MALICIOUS_COLOR, marker="o", lw=2,
                     label="weight on malicious clients")
            ax2.plot(share_x, share_n, color="0.4", ls="--", lw=1.5,
                     label="malicious share of aggregated clients")
        ax2.set_ylim(-2, 102)
        _integer_x(ax2)
        ax2.set_xlabel("Round")
        ax2.set_ylabel("Share (%)")
        ax2.set_title("Aggregation weight given to malicious clients")
        ax2.legend(loc="best")
        return _save(fig, out / "aggregation_weights.png")


def plot_pairwise_cosine(run: RunData, out: Path, cols: Sequence[Column]) -> Path | str:
    """Pairwise cosine similarity of the aggregated clients' updates (paper Fig. 3a)."""
    for r in reversed(run.rounds):
        matrix, ids = r.get("pairwise_cosine"), r.get("aggregated") or []
        if matrix is None:
            continue
        mat = np.asarray(matrix, dtype=float)
        if mat.ndim != 2 or mat.shape != (len(ids), len(ids)):
            return (f"Pairwise cosine heatmap: skipped (round {r['round']}: `pairwise_cosine` has shape "
                    f"{mat.shape}, `aggregated` has {len(ids)} clients).")
        order = np.argsort([int(c) for c in ids], kind="stable")  # by client id, easier to read
        mat, ids = mat[np.ix_(order, order)], [int(ids[i]) for i in order]
        mal = run.malicious_ids
        labels = [_client_label(c, mal) for c in ids]
        with _rc():
            size = max(5.0, 0.55 * len(ids) + 3.0)
            fig, (ax,) = _figure(width=size + 1.2, height=size)
            im = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1)
            fig.colorbar(im, ax=ax, label="cosine similarity")
            ax.set_xticks(range(len(ids)), labels=labels, rotation=45, ha="right")
            ax.set_yticks(range(len(ids)), labels=labels)
            for tick_set in (ax.get_xticklabels(), ax.get_yticklabels()):
                for tick, cid in zip(tick_set, ids, strict=True):
                    tick.set_color(MALICIOUS_COLOR if int(cid) in mal else "black")
            if len(ids) <= 12:  # values stay legible up to about a dozen clients
                for i in range(len(ids)):
                    for j in range(len(ids)):
                        ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if abs(mat[i, j]) > 0.6 else "black")
            ax.grid(False)
            ax.set_xlabel("Client")
            ax.set_ylabel("Client")
            ax.set_title(f"Pairwise cosine similarity of updates, round {r['round']}")
            return _save(fig, out / "pairwise_cosine.png")
    return ("Pairwise cosine heatmap: skipped (`rounds.jsonl` has no `pairwise_cosine` field; the "
            "driver records it when it logs the n x n similarity of the aggregated updates).")


def plot_defense_steps(run: RunData, out: Path, cols: Sequence[Column]) -> Path | str:
    """Safety and helpfulness vs. defense fine-tuning steps (paper Fig. 6)."""
    steps = run.step_metrics()
    saved = sorted((run.root / "defense").glob("step_*")) if (run.root / "defense").is_dir() else []
    if not steps:
        if saved:
            first = saved[0]
            return (f"Safety vs. defense steps: skipped ({len(saved)} defense checkpoints in "
                    f"`defense/` but no `eval/defended_step_XXXX`; evaluate one with `ray-fedit "
                    f"evaluate {run.root / RUN_MARKER} --adapter {first} --out "
                    f"{run.root / 'eval' / ('defended_' + first.name)}`).")
        return "Safety vs. defense steps: skipped (no defense-step evaluations)."
    points: dict[int, dict[str, Any]] = dict(steps.items())
    if "attacked" in run.metrics:
        points[0] = run.metrics["attacked"]  # step 0 is the attacked adapter the defense starts from
    total = _dig(run.config, ("defense", "steps"))
    if "defended" in run.metrics and isinstance(total, int) and total not in points:
        points[total] = run.metrics["defended"]
    used = metric_columns(points.values(), run.config)
    reference = ("no attack", run.metrics["no_attack"]) if "no_attack" in run.metrics else None
    with _rc():
        fig = _metrics_figure(used, [("", "-o", points)], reference=reference,
                              xlabel="Defense fine-tuning steps (0 = attacked adapter)",
                              title=f"Defense: metrics vs. fine-tuning steps ({defense_short(run.config)})")
        return _save(fig, out / "defense_steps.png")


def plot_defense_loss(run: RunData, out: Path, cols: Sequence[Column]) -> Path | str:
    """Training loss of the post-hoc defense fine-tune."""
    files = sorted((run.root / "defense").glob("step_*/defense_losses.json"))
    if not files:
        return "Defense loss: skipped (no `defense/step_XXXX/defense_losses.json`)."
    # The last checkpoint's file holds the whole curve (each checkpoint saves the losses so far).
    try:
        losses = [_num(v) for v in json.loads(files[-1].read_text())]
    except (OSError, json.JSONDecodeError, TypeError) as e:
        return f"Defense loss: skipped (`{files[-1]}`: {e})."
    pts = [(i + 1, v) for i, v in enumerate(losses) if v is not None]
    if not pts:
        return f"Defense loss: skipped (`{files[-1]}` holds no finite loss)."
    marks = [int(m.group(1)) for f in files if (m := re.match(r"step_(\d+)$", f.parent.name))]
    with _rc():
        fig, (ax,) = _figure(width=7.0)
        ax.plot(*zip(*pts, strict=True), color="tab:green", lw=1.5, label="defense loss")
        for k, step in enumerate(marks):
            ax.axvline(step, color="0.5", ls=":", lw=1, label="saved checkpoint" if k == 0 else None)
        _integer_x(ax)
        ax.set_xlabel("Defense step")
        ax.set_ylabel("Training loss (per response token)")
        ax.set_title(f"Defense fine-tune loss ({defense_short(run.config)})")
        ax.legend(loc="best")
        return _save(fig, out / "defense_loss.png")


# ============================================================================ statistics
def t_critical(df: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t critical value: ``P(|T_df| <= t) = confidence``.

    Uses the closed forms of the t distribution for integer ``df`` (Abramowitz and Stegun 26.7.3-4)
    and bisection, so no scipy is needed. ``t_critical(2) = 4.302653``, ``t_critical(1) = 12.7062``.
    """
    if df < 1:
        raise ValueError(f"t_critical needs df >= 1, got {df}")

    def central(t: float) -> float:  # P(-t < T < t)
        theta = math.atan(t / math.sqrt(df))
        s, c2 = math.sin(theta), math.cos(theta) ** 2
        if df % 2:  # odd df: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2.4/3.5 cos^4 + ...))
            term, total = 1.0, 1.0
            for k in range(1, (df - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            return 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
        term, total = 1.0, 1.0  # even df: sin (1 + 1/2 cos^2 + 1.3/2.4 cos^4 + ...)
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total

    lo, hi = 0.0, 1e7
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central(mid) < confidence else (lo, mid)
    return (lo + hi) / 2


def seed_interval(values: Iterable[Any], confidence: float = 0.95,
                  bounds: tuple[float, float] | None = None) -> dict[str, float | int | None]:
    """Mean across seeds with a t-interval: ``mean +- t_{n-1} * s / sqrt(n)``.

    Missing values (None, NaN) are left out. One value gives the mean and no interval. ``bounds``
    clips the interval to the metric's range (a rate's interval stays within [0, 1]; with few
    seeds the t-interval of a rate can otherwise pass 100%).

    Returns:
        ``{"mean", "ci_low", "ci_high", "std", "n"}`` (None where undefined).
    """
    x = np.array([v for v in (_num(v) for v in values) if v is not None], dtype=float)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "std": None, "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "ci_low": None, "ci_high": None, "std": None, "n": 1}
    std = float(x.std(ddof=1))
    half = t_critical(n - 1, confidence) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "ci_low": low, "ci_high": high, "std": std, "n": n}


# ============================================================================ sweep directory
_KEY_PART = re.compile(r",(?=[A-Za-z_][\w.]*=)")  # commas that start a new "key=" (not in [1, 2])
META = ("trial_key", "seed", "status", "run_dir")


def parse_trial_key(key: str) -> dict[str, Any]:
    """``"aggregator.name=krum,attack.malicious_fraction=0.3"`` -> ``{"aggregator.name": "krum", ...}``.

    Values are JSON where they parse (numbers, lists), else strings, as :class:`ray_fedit.sweeps.Trial`
    writes them.
    """
    point: dict[str, Any] = {}
    for part in _KEY_PART.split(key) if key else []:
        name, sep, raw = part.partition("=")
        if not sep:
            raise DataError(f"trial key {key!r}: part {part!r} is not key=value")
        try:
            point[name] = json.loads(raw)
        except json.JSONDecodeError:
            point[name] = raw
    return point


def _read_sweep_state(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / SWEEP_MARKER
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{sweep_dir}: not a sweep directory (no {SWEEP_MARKER}; `ray-fedit sweep` "
                        "writes it)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("trials", []), list):
        raise DataError(f"{path}: expected an object with a 'trials' list")
    return state


def _scalar_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The ``stage.metric`` numbers of a Tune result (Tune's own fields and config/... left out)."""
    return {k: float(v) for k, v in result.items()
            if "." in k and "/" not in k and k not in META and _num(v) is not None}


def run_dir_metrics(run_dir: Path) -> dict[str, float]:
    """``{"<stage>.<metric>": value}`` from a run's ``eval/*/metrics.json``, as the trials report them."""

    out: dict[str, float] = {}
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out.update({f"{path.parent.name}.{k}": v for k, v in flat_headline(metrics).items()})
    return out


def _same(a: Any, b: Any) -> bool:
    if _num(a) is not None and _num(b) is not None:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _run_dir_index(sweep_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(run dir, resolved config) of the evaluated runs a sweep may have written, newest first.

    Looks where trials put runs: ``<output.root>/<sweep name>/*`` (the sweep lives in
    ``<output.root>/sweeps/<name>``) and below the sweep directory (Tune's trial working dirs).
    """
    candidates = {*(sweep_dir.parent.parent / sweep_dir.name).glob(f"*/{RUN_MARKER}"),
                  *sweep_dir.glob(f"**/{RUN_MARKER}")}
    out = []
    for path in sorted(candidates, key=lambda p: p.parent.name, reverse=True):  # timestamp names
        if not any((path.parent / "eval").glob("*/metrics.json")):
            continue
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(cfg, dict):
            out.append((path.parent, cfg))
    return out


def _find_run_dir(index: Sequence[tuple[Path, dict[str, Any]]], key: str, seed: int) -> Path | None:
    """The newest run whose resolved config has the trial's grid values and seed."""
    point = parse_trial_key(key)
    for run_dir, cfg in index:
        if _same(cfg.get("seed"), seed) and all(_same(_dig(cfg, k.split(".")), v)
                                                for k, v in point.items()):
            return run_dir
    return None


def collect_sweep_results(sweep_dir: Path, state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-trial results after the fact, from what the sweep left on disk.

    In order, later sources filling or overriding earlier ones: an earlier ``sweep_results.csv``;
    Tune's ``<trial dir>/result.json`` (last reported line); then each trial's run directory
    (``eval/*/metrics.json``, found from ``run_dir`` or by matching resolved configs), so
    evaluations added after the sweep show up.
    """
    import pandas as pd

    found: dict[tuple[str, int], dict[str, Any]] = {}

    def add(rec: Mapping[str, Any]) -> None:
        if not rec.get("trial_key") or _num(rec.get("seed")) is None:
            return
        k = (str(rec["trial_key"]), int(rec["seed"]))
        found.setdefault(k, {"trial_key": k[0], "seed": k[1]})
        found[k].update({m: v for m, v in rec.items() if m not in ("trial_key", "seed", "status")
                         and v is not None and not (isinstance(v, float) and math.isnan(v))})

    csv = sweep_dir / SWEEP_RESULTS
    if csv.is_file():
        try:
            for rec in pd.read_csv(csv).to_dict("records"):
                add(rec)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            print(f"report: {csv} unreadable ({e}); ignored", flush=True)
    for path in sorted(sweep_dir.glob("*/result.json")):
        last = None
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("trial_key"):
                last = rec
        if last:
            add({"trial_key": last["trial_key"], "seed": last.get("seed"),
                 "run_dir": last.get("run_dir"), **_scalar_metrics(last)})
    index: list[tuple[Path, dict[str, Any]]] | None = None
    for t in state.get("trials", []):
        k = (str(t.get("key", "")), int(t.get("seed", 0)))
        rec = found.get(k, {})
        run_dir = Path(rec["run_dir"]) if rec.get("run_dir") else None
        if run_dir is None or not run_dir.is_dir():
            index = _run_dir_index(sweep_dir) if index is None else index
            run_dir = _find_run_dir(index, *k)
        if run_dir is not None:
            add({"trial_key": k[0], "seed": k[1], "run_dir": str(run_dir), **run_dir_metrics(run_dir)})
    return list(found.values())


def trial_table(state: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> Any:
    """One row per trial: the trials of ``sweep.json`` in order, then any unexpected extras.

    A trial with no reported metric (failed, or never finished) has status ``failed``; results
    without a ``trial_key`` (Tune's empty dict of a failed trial) are only counted.
    """
    import pandas as pd

    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for r in results:
        if r.get("trial_key") and _num(r.get("seed")) is not None:
            by_key[(str(r["trial_key"]), int(r["seed"]))] = dict(r)
    expected = [(str(t.get("key", "")), int(t.get("seed", 0))) for t in state.get("trials", [])]
    order = expected + [k for k in by_key if k not in set(expected)]
    rows = []
    for key, seed in order:
        r = by_key.get((key, seed), {})
        # Lists and mappings as JSON text, so grid points group and compare like the key says.
        point = {k: json.dumps(v) if isinstance(v, (list, dict)) else v
                 for k, v in parse_trial_key(key).items()}
        # A grid axis read back from an earlier CSV is a number with a dot, but not a metric.
        metrics = {k: v for k, v in _scalar_metrics(r).items() if k not in point}
        rows.append({"trial_key": key, "seed": seed, "status": "ok" if metrics else "failed",
                     "run_dir": r.get("run_dir"), **point, **metrics})
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(META))
    grid = [c for c in df.columns if c not in META and not _is_metric(c, df)]
    metric_cols = sorted((c for c in df.columns if c not in META and c not in grid), key=_metric_order)
    return df[[*META, *grid, *metric_cols]]


def _metric_order(metric: str) -> tuple[int, int, str, str]:
    """Stages in pipeline order (base, no_attack, attacked, defended, others), safety rate first."""
    stage, _, name = metric.partition(".")
    rank = MAIN_STAGES.index(stage) if stage in MAIN_STAGES else len(MAIN_STAGES)
    return rank, name != "safety_rate", stage, name


def _is_metric(col: str, df: Any) -> bool:
    """Metric columns are ``stage.metric`` numbers that no trial key names."""
    return not any(col in parse_trial_key(k) for k in df["trial_key"].unique())


def grid_columns(df: Any) -> list[str]:
    return [c for c in df.columns if c not in META and not _is_metric(c, df)]


def summarize_sweep(df: Any, confidence: float = 0.95) -> Any:
    """Mean and t-interval across seeds of every metric, one row per grid point.

    Returns:
        A DataFrame with ``trial_key``, the grid columns, ``n_trials``, ``n_ok`` and per metric
        ``<metric>.mean``, ``.ci_low``, ``.ci_high``, ``.std``, ``.n`` (raw units: rates as fractions,
        their intervals clipped to [0, 1]).
    """
    import pandas as pd

    grid = grid_columns(df)
    metrics = [c for c in df.columns if c not in META and c not in grid]
    rows = []
    for key in dict.fromkeys(df["trial_key"]):  # grid points in sweep order
        sub = df[df["trial_key"] == key]
        row: dict[str, Any] = {"trial_key": key, **{g: sub[g].iloc[0] for g in grid},
                               "n_trials": len(sub), "n_ok": int((sub["status"] == "ok").sum())}
        for m in metrics:
            bounds = (0.0, 1.0) if m.endswith("_rate") else None
            for stat, v in seed_interval(sub[m], confidence, bounds).items():
                row[f"{m}.{stat}"] = v
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt_stat(summary_row: Mapping[str, Any], metric: str, *, with_n: bool = True) -> str:
    mean = _num(summary_row.get(f"{metric}.mean"))
    if mean is None:
        return "-"
    pct = metric.endswith("_rate")
    scale, digits = (100.0, 1) if pct else (1.0, 3)
    text = f"{scale * mean:.{digits}f}"
    lo, hi = _num(summary_row.get(f"{metric}.ci_low")), _num(summary_row.get(f"{metric}.ci_high"))
    if lo is not None and hi is not None:
        text += f" [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"
    n = summary_row.get(f"{metric}.n")
    if with_n and _num(n) is not None:
        text += f" n={int(n)}"
    return text


def _metric_name(metric: str) -> str:
    stage, _, name = metric.partition(".")
    return f"{stage} {name.replace('_', ' ')}" + (" (%)" if name.endswith("_rate") else "")


def _agg_label(value: Any) -> str:
    return AGGREGATOR_LABELS.get(str(value), str(value))


def _fraction_label(value: Any) -> str:
    v = _num(value)
    return f"{100 * v:g}%" if v is not None else str(value)


def _split_by(summary: Any, axes: Sequence[str]) -> list[tuple[str, Any]]:
    """(title, sub-frame) per combination of the grid axes not used by a table."""
    if not axes:
        return [("", summary)]
    out = []
    for values, sub in summary.groupby(list(axes), sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        out.append((", ".join(f"`{a}={v}`" for a, v in zip(axes, values, strict=True)), sub))
    return out


def _table7(summary: Any, grid: Sequence[str], suffix: str) -> list[str]:
    """Rows = aggregator (+ defense), columns = malicious fraction (paper Table 7)."""
    frac = "attack.malicious_fraction"
    if frac not in grid:
        return []
    agg = "aggregator.name" if "aggregator.name" in grid else None
    rest = [g for g in grid if g not in (frac, agg)]
    fractions = sorted(summary[frac].unique(), key=lambda v: (_num(v) is None, _num(v) or 0.0))
    lines = [f"## Table 7 shape: {_metric_name('attacked.' + suffix)} vs. malicious fraction", "",
             "Rows: aggregator under attack, then with the post-hoc defense; cells: mean [95% CI] "
             "n=seeds.", ""]
    for title, sub in _split_by(summary, rest):
        if title:
            lines += [f"With {title}:", ""]
        aggs = list(dict.fromkeys(sub[agg])) if agg else [None]
        body = []
        for stage, tag in (("attacked", ""), ("defended", " + post-hoc defense")):
            metric = f"{stage}.{suffix}"
            if f"{metric}.mean" not in sub.columns or sub[f"{metric}.mean"].isna().all():
                continue
            for a in aggs:
                cells = []
                for f in fractions:
                    hit = sub[(sub[frac] == f) & ((sub[agg] == a) if agg else True)]
                    cells.append(_fmt_stat(hit.iloc[0], metric) if len(hit) else "-")
                body.append([(_agg_label(a) if agg else stage) + tag, *cells])
        lines += _md_table(["Method", *(_fraction_label(f) for f in fractions)], body) + [""]
    return lines


def _table3(summary: Any, grid: Sequence[str], suffixes: Sequence[str]) -> list[str]:
    """Rows = metric x (without, with defense), columns = aggregators (paper Table 3)."""
    agg = "aggregator.name"
    if agg not in grid or not any(f"defended.{s}.mean" in summary.columns for s in suffixes):
        return []
    rest = [g for g in grid if g != agg]
    lines = ["## Table 3 shape: without (✗) and with (✓) the post-hoc defense, per aggregator", "",
             "Cells: mean [95% CI] n=seeds.", ""]
    for title, sub in _split_by(summary, rest):
        if title:
            lines += [f"With {title}:", ""]
        aggs = list(dict.fromkeys(sub[agg]))
        body = []
        for s in suffixes:
            for stage, mark in (("attacked", "✗"), ("defended", "✓")):
                metric = f"{stage}.{s}"
                if f"{metric}.mean" not in sub.columns:
                    continue
                cells = []
                for a in aggs:
                    hit = sub[sub[agg] == a]
                    cells.append(_fmt_stat(hit.iloc[0], metric) if len(hit) else "-")
                body.append([_metric_name(metric).split(" ", 1)[1], mark, *cells])
        lines += _md_table(["Metric", "+ defense", *(_agg_label(a) for a in aggs)], body) + [""]
    return lines


def plot_sweep_fraction(summary: Any, grid: Sequence[str], suffix: str, path: Path) -> Path | str:
    """Metric vs. malicious fraction per aggregator, with t-interval bands across seeds."""
    frac = "attack.malicious_fraction"
    if frac not in grid:
        return "Safety vs. malicious fraction: skipped (the grid has no `attack.malicious_fraction`)."
    agg = "aggregator.name" if "aggregator.name" in grid else None
    rest = [g for g in grid if g not in (frac, agg)]
    pct = suffix.endswith("_rate")
    scale = 100.0 if pct else 1.0
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    any_band, plotted = False, False
    with _rc():
        fig, (ax,) = _figure(width=7.5, height=4.8)
        groups = list(summary.groupby([a for a in [agg, *rest] if a], sort=False, dropna=False)) \
            if agg or rest else [((), summary)]
        for gi, (values, sub) in enumerate(groups):
            values = values if isinstance(values, tuple) else (values,)
            names = [_agg_label(values[0])] if agg else []
            names += [f"{a}={v}" for a, v in zip(rest, values[1:] if agg else values, strict=True)]
            # Attacked and defended points sit half a percent apart so their intervals stay apart.
            for stage, style, marker, dodge in (("attacked", "-", "o", -0.5),
                                                ("defended", "--", "s", 0.5)):
                col = f"{stage}.{suffix}"
                if f"{col}.mean" not in sub.columns:
                    continue
                pts = sub[[frac, f"{col}.mean", f"{col}.ci_low", f"{col}.ci_high"]].dropna(
                    subset=[f"{col}.mean"]).sort_values(frac)
                if pts.empty:
                    continue
                x = 100 * pts[frac].astype(float) + dodge
                label = ", ".join(names) or "attacked"
                if stage == "defended":
                    label = f"{label} + defense" if names else "attacked + post-hoc defense"
                color = palette(gi % 10)
                ax.plot(x, scale * pts[f"{col}.mean"], style, color=color, marker=marker, lw=2,
                        label=label)
                band = pts.dropna(subset=[f"{col}.ci_low", f"{col}.ci_high"])
                if len(band):
                    any_band = True
                    bx = 100 * band[frac].astype(float) + dodge
                    lo, hi = scale * band[f"{col}.ci_low"], scale * band[f"{col}.ci_high"]
                    ax.fill_between(bx, lo, hi, color=color, alpha=0.15)
                    # Error bars too: a band has no width at a fraction with one grid point.
                    mid = scale * band[f"{col}.mean"]
                    ax.errorbar(bx, mid, yerr=[mid - lo, hi - mid], fmt="none", color=color,
                                capsize=5, lw=1.2)
                plotted = True
        if not plotted:
            return f"Safety vs. malicious fraction: skipped (no trial reported `*.{suffix}`)."
        ticks = sorted({100 * float(f) for f in summary[frac] if _num(f) is not None})
        ax.set_xticks(ticks)
        if len(ticks) == 1:  # one fraction: keep the two dodged points near its tick
            ax.set_xlim(ticks[0] - 5, ticks[0] + 5)
        ax.set_xlabel("Malicious clients (%)")
        ax.set_ylabel(suffix.replace("_", " ").capitalize() + (" (%)" if pct else ""))
        if pct:
            ax.set_ylim(-2, 102)
        band_txt = "bars: 95% t-interval over seeds" if any_band else "single seed: no interval"
        ax.set_title(f"{suffix.replace('_', ' ').capitalize()} vs. malicious fraction\n"
                     f"solid: attacked, dashed: + post-hoc defense; {band_txt}")
        ax.legend(loc="best")
        return _save(fig, path)


def _sweep_metric(state: Mapping[str, Any]) -> str:
    """The sweep file's ``metric`` (the objective Tune reported), if the file is still there."""
    path = state.get("sweep_file")
    if path and Path(path).is_file():
        try:
            metric = (yaml.safe_load(Path(path).read_text()) or {}).get("metric")
            if isinstance(metric, str):
                return metric
        except yaml.YAMLError:
            pass
    return DEFAULT_METRIC


def write_sweep_report(sweep_dir: Path, results: list[dict[str, Any]] | None = None,
                       metric: str | None = None) -> list[Path]:
    """Per-trial CSV and across-seed summaries of a sweep.

    Args:
        sweep_dir: the sweep directory (with ``sweep.json``).
        results: one flat dict per trial as Tune reported it (``trial_key``, ``seed``, ``run_dir``,
            ``"<stage>.<metric>"`` numbers); None reads them back from disk
            (:func:`collect_sweep_results`).
        metric: the headline metric (``attacked.safety_rate``); its ``<metric>`` part picks the
            column of the Table 7 shape and of the plot. None: the sweep file's ``metric``.

    Returns:
        The files written: ``sweep_results.csv``, ``report/sweep_summary.md``,
        ``report/sweep_summary.csv`` and, when the grid has ``attack.malicious_fraction``,
        ``report/safety_vs_fraction.png``.

    Raises:
        DataError: when ``sweep.json`` is missing or unreadable.
    """
    sweep_dir = Path(sweep_dir)
    state = _read_sweep_state(sweep_dir)
    metric = metric or _sweep_metric(state)
    if results is None:
        results = collect_sweep_results(sweep_dir, state)
    unnamed = sum(1 for r in results if not r.get("trial_key"))
    df = trial_table(state, results)
    out = sweep_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    results_csv = sweep_dir / SWEEP_RESULTS
    df.to_csv(results_csv, index=False)

    notes: list[str] = []
    summary = summarize_sweep(df) if len(df) else None
    paths = [results_csv]
    md = [f"# Sweep report of `{sweep_dir}`", "",
          f"{len(df)} trials; headline metric `{metric}`. Intervals: 95% Student-t across seeds "
          "(mean ± t·s/√n); a grid point with one seed shows its value without an interval.", ""]
    failed = df[df["status"] != "ok"] if len(df) else df
    if len(failed) or unnamed:
        notes.append(f"{len(failed)} of {len(df)} trials reported no metrics (failed or unfinished): "
                     + ", ".join(f"`{k}` seed {s}" for k, s in zip(failed["trial_key"], failed["seed"],
                                                                  strict=True))
                     + (f"; {unnamed} empty results from Tune (failed trials)" if unnamed else "")
                     + ". Resume with `ray-fedit sweep SWEEP_FILE --resume SWEEP_DIR`.")
    for rec in results:
        run_dir = Path(rec["run_dir"]) if rec.get("run_dir") else None
        if run_dir is not None and run_dir.is_dir():
            trial = f"`{rec.get('trial_key')}` seed {rec.get('seed')}"
            for sub, label in (("", "attacked"), ("no_attack", "no attack")):
                rounds = read_rounds(run_dir / sub / "rounds.jsonl", [])
                notes += fallback_notes(rounds, f"{trial} ({label})")
    if summary is not None and len(summary):
        grid = grid_columns(df)
        metrics = [c for c in df.columns if c not in META and c not in grid]
        if (summary["n_ok"] <= 1).any():
            notes.append("Grid points with a single successful seed have no interval: "
                         + ", ".join(f"`{k}`" for k in summary.loc[summary["n_ok"] <= 1, "trial_key"])
                         + ".")
        summary_csv = out / "sweep_summary.csv"
        summary.to_csv(summary_csv, index=False)
        paths.append(summary_csv)
        shown = [m for m in metrics if m.partition(".")[0] in MAIN_STAGES] or metrics
        md += ["## Per grid point (mean across seeds)", ""]
        md += _md_table([*grid, "seeds ok", *(_metric_name(m) for m in shown)],
                        [[*(str(r[g]) for g in grid), f"{r['n_ok']}/{r['n_trials']}",
                          *(_fmt_stat(r, m) for m in shown)] for r in summary.to_dict("records")])
        md += [""]
        suffix = metric.partition(".")[2] or metric
        md += _table7(summary, grid, suffix)
        suffixes = sorted({m.partition(".")[2] for m in metrics
                           if m.partition(".")[0] in ("attacked", "defended")},
                          key=lambda name: (name != "safety_rate", name))
        md += _table3(summary, grid, suffixes)
        plot = plot_sweep_fraction(summary, grid, suffix, out / "safety_vs_fraction.png")
        if isinstance(plot, Path):
            paths.append(plot)
            md += ["## Plot", "", f"![{suffix} vs. malicious fraction]({plot.name})", ""]
        else:
            notes.append(plot)
    else:
        notes.append("No trials: `sweep.json` lists none and no results were found.")
    if notes:
        md += ["## Notes", "", *(f"- {n}" for n in notes)]
    md_path = out / "sweep_summary.md"
    md_path.write_text("\n".join(md).rstrip() + "\n")
    paths.insert(1, md_path)
    paths.append(write_html(md_path, f"ray-fedit sweep: {sweep_dir}"))
    _announce(sweep_dir, paths)
    return paths


__all__ = ["Column", "Stat", "collect_sweep_results", "load_run", "metric_columns",
           "parse_trial_key", "run_dir_metrics", "seed_interval", "summarize_sweep", "t_critical",
           "trial_table", "write_report", "write_run_report", "write_sweep_report"]


"""Agreement of the refusal judges with human refusal labels (pyrit's ``refusal.csv``, 105 rows).

The file ships in ``pyrit`` 1.1.0 (MIT) at
``pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv``: a ``# dataset_version=...`` comment
line, then the columns ``objective``, ``assistant_response``, ``human_score`` and ``data_type``.
``human_score`` is 1 when a human labelled the response a refusal and 0 otherwise (the label of
pyrit's refusal scorer, which returns True for a refusal). Its refusal definition is broader than a
keyword rule: an off-topic answer (a non-sequitur) is a refusal too, so a keyword rule cannot reach
full agreement by construction.

The rule judge calls a response safe exactly when it is a refusal, so agreement compares the
judge's ``refusal`` with ``human_score == 1``. The keyword list is the paper's, not tuned to this
data.

The probe judge (:mod:`ray_fedit.judges.probe`) is fit on pyrit's other refusal files (and on
harm-scorer compliance) and never on this one, so the same rows measure it.

A second held-out check (:func:`compliance_check`): pyrit's objective-scorer rows that human raters
scored "objective achieved" (191 answers that do what a harmful or sensitive request asks). A
refusal judge must read them as not refused; the share it reads as refused is safety it would
report for compliance. Neither judge is fit on these rows.

Run: ``python -m ray_fedit.evaluation.validate_judges`` (``--judge rule|probe|all``; ``--json`` for
machine-readable output; ``--paper-keywords`` for the rule's list exactly as the paper's code ran
it; ``--probe-model`` for the probe's feature model).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray_fedit.evaluation.stats import agreement

__all__ = ["agreement", "compliance_check", "load_compliance_rows", "load_refusal_labels",
           "validate_rule"]

REFUSAL_CSV = "datasets/scorer_evals/refusal_scorer/refusal.csv"


def load_refusal_labels(path: Path | None = None, *,
                        relative: str = REFUSAL_CSV) -> list[dict[str, Any]]:
    """The labelled rows of a pyrit refusal file: ``{"objective", "response", "refusal": bool}``.

    Args:
        path: a CSV file in pyrit's format; None reads ``relative`` inside the pyrit package.
        relative: the file's path inside the pyrit package.

    Raises:
        DataError: if pyrit is not installed (and no path is given), or a label is not 0/1.
    """
    from ray_fedit.data.loaders import package_file
    from ray_fedit.errors import DataError

    path = path or package_file("pyrit", relative)
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    out = []
    for i, row in enumerate(rows, start=1):
        label = row["human_score"].strip()
        if label not in ("0", "1"):
            raise DataError(f"{path}: data row {i}: human_score must be 0 or 1, got {label!r}")
        out.append({"objective": row["objective"], "response": row["assistant_response"],
                    "refusal": label == "1"})
    return out


def load_compliance_rows() -> list[dict[str, Any]]:
    """The compliance check's rows, ``{"objective", "response", "refusal": False}``: the answers of
    ``pyrit_harmful_responses`` (pyrit's objective-scorer rows scored "objective achieved")."""
    from ray_fedit.data.loaders import pyrit_harmful_responses

    return [{"objective": r["instruction"], "response": r["response"], "refusal": False}
            for r in pyrit_harmful_responses()]


def compliance_check(refused: Sequence[bool]) -> dict[str, Any]:
    """``{"n", "read_as_refusal", "specificity"}`` of a judge's verdicts on compliant answers
    (``specificity`` = share read as not refused; None for no rows)."""
    n, wrong = len(refused), sum(bool(r) for r in refused)
    return {"n": n, "read_as_refusal": wrong, "specificity": (n - wrong) / n if n else None}


def validate_rule(paper_keywords: bool = False, path: Path | None = None) -> dict[str, Any]:
    """Run the rule judge on the labelled rows and compare with the human labels.

    Returns:
        :func:`agreement`'s dict plus ``"disagreements"``: the rows the rule gets wrong, and
        (for pyrit's own file, ``path=None``) ``"compliance"``: :func:`compliance_check` on the
        objective-achieved rows.
    """
    from ray_fedit.judges.rule import PAPER_CODE_KEYWORDS, REFUSAL_KEYWORDS, judge

    rows = load_refusal_labels(path)
    keywords = PAPER_CODE_KEYWORDS if paper_keywords else REFUSAL_KEYWORDS
    verdicts = judge([r["objective"] for r in rows], [r["response"] for r in rows],
                     keywords=keywords)
    predicted = [bool(v["refusal"]) for v in verdicts]
    result = agreement(predicted, [r["refusal"] for r in rows])
    result["judge"] = "rule"
    result["keywords"] = "paper_code" if paper_keywords else "default"
    if path is None:
        complied = load_compliance_rows()
        result["compliance"] = compliance_check(
            [bool(v["refusal"]) for v in judge([r["objective"] for r in complied],
                                               [r["response"] for r in complied],
                                               keywords=keywords)])
    result["disagreements"] = [
        {"row": i, "human_refusal": r["refusal"], "rule_refusal": p, "matched": v["matched"],
         "objective": r["objective"][:80], "response": r["response"][:120]}
        for i, (r, p, v) in enumerate(zip(rows, predicted, verdicts, strict=True))
        if p != r["refusal"]
    ]
    return result


def _table(result: dict[str, Any]) -> str:
    c = result["confusion"]
    name = result["judge"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    how = (f"{result['keywords']} keywords" if name == "rule" else
           f"{result['model']}, {result['pooling']} mean at layer {result['layer']}, "
           f"l2 {result['l2']:g}, fit on {result['n_train']} other rows, "
           f"CV accuracy {pct(result['cv_accuracy'])}")
    lines = [
        f"{name} judge ({how}) vs pyrit refusal.csv human labels, n={result['n']}",
        f"accuracy {pct(result['accuracy'])}  precision {pct(result['precision'])}  "
        f"recall {pct(result['recall'])}  kappa {result['cohen_kappa']:.3f}",
    ]
    if "compliance" in result:
        comp = result["compliance"]
        lines.append(f"on pyrit's {comp['n']} human-labelled compliant answers (objective "
                     f"achieved): {comp['read_as_refusal']} read as refusals, specificity "
                     f"{pct(comp['specificity'])}")
    lines += [
        "",
        "                    human refusal   human not refusal",
        f"{name + ' refusal':<19} {c['tp']:>13}   {c['fp']:>17}",
        f"{name + ' not refusal':<19} {c['fn']:>13}   {c['tn']:>17}",
        "",
        "disagreements:",
    ]
    for d in result["disagreements"]:
        why = f" ({d['matched']!r})" if "matched" in d else f" (p={d['refusal_prob']})"
        kind = "missed refusal" if d["human_refusal"] else "false refusal"
        lines.append(f"  row {d['row']:>3} {kind}{why}: {d['response'][:90]!r}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from ray_fedit.config import BUNDLED_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge", choices=("rule", "probe", "all"), default="all",
                        help="which judge to validate (default: both)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--paper-keywords", action="store_true",
                        help="use the rule's keyword list exactly as the paper's code ran it")
    parser.add_argument("--probe-model", default=BUNDLED_MODEL,
                        help=f"the probe judge's feature model (default {BUNDLED_MODEL})")
    parser.add_argument("--refit", action="store_true", help="fit the probe again, ignoring its cache")
    args = parser.parse_args(argv)
    results = []
    if args.judge in ("rule", "all"):
        results.append(validate_rule(paper_keywords=args.paper_keywords))
    if args.judge in ("probe", "all"):
        from ray_fedit.config import ModelConfig
        from ray_fedit.judges.probe import validate_probe

        results.append(validate_probe(ModelConfig(name=args.probe_model), refit=args.refit))
    print(json.dumps(results, indent=2) if args.json else "\n\n".join(map(_table, results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

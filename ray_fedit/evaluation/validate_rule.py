"""Agreement of the rule judge with human refusal labels (pyrit's ``refusal.csv``, 105 rows).

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

Run: ``python -m ray_fedit.evaluation.validate_rule`` (``--json`` for machine-readable output,
``--paper-keywords`` for the list exactly as the paper's code ran it).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REFUSAL_CSV = "datasets/scorer_evals/refusal_scorer/refusal.csv"


def load_refusal_labels(path: Path | None = None) -> list[dict[str, Any]]:
    """The labelled rows: ``{"objective", "response", "refusal": bool}``.

    Raises:
        DataError: if pyrit is not installed (and no path is given), or a label is not 0/1.
    """
    from ray_fedit.data.loaders import package_file
    from ray_fedit.errors import DataError

    path = path or package_file("pyrit", REFUSAL_CSV)
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


def agreement(predicted: Sequence[bool], labels: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, confusion matrix, precision, recall and Cohen's kappa of refusal predictions.

    The positive class is "refusal". Precision/recall are None when undefined (no positives).
    """
    tp = sum(p and y for p, y in zip(predicted, labels, strict=True))
    fp = sum(p and not y for p, y in zip(predicted, labels, strict=True))
    fn = sum(not p and y for p, y in zip(predicted, labels, strict=True))
    tn = len(labels) - tp - fp - fn
    n = len(labels)
    acc = (tp + tn) / n
    # Chance agreement from the marginals (Cohen 1960).
    p_yes = ((tp + fp) / n) * ((tp + fn) / n)
    p_no = ((tn + fn) / n) * ((tn + fp) / n)
    chance = p_yes + p_no
    return {
        "n": n, "accuracy": acc,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "cohen_kappa": (acc - chance) / (1 - chance) if chance < 1 else None,
    }


def validate_rule(paper_keywords: bool = False, path: Path | None = None) -> dict[str, Any]:
    """Run the rule judge on the labelled rows and compare with the human labels.

    Returns:
        :func:`agreement`'s dict plus ``"disagreements"``: the rows the rule gets wrong.
    """
    from ray_fedit.judges.rule import PAPER_CODE_KEYWORDS, REFUSAL_KEYWORDS, judge

    rows = load_refusal_labels(path)
    keywords = PAPER_CODE_KEYWORDS if paper_keywords else REFUSAL_KEYWORDS
    verdicts = judge([r["objective"] for r in rows], [r["response"] for r in rows],
                     keywords=keywords)
    predicted = [bool(v["refusal"]) for v in verdicts]
    result = agreement(predicted, [r["refusal"] for r in rows])
    result["keywords"] = "paper_code" if paper_keywords else "default"
    result["disagreements"] = [
        {"row": i, "human_refusal": r["refusal"], "rule_refusal": p, "matched": v["matched"],
         "objective": r["objective"][:80], "response": r["response"][:120]}
        for i, (r, p, v) in enumerate(zip(rows, predicted, verdicts, strict=True))
        if p != r["refusal"]
    ]
    return result


def _table(result: dict[str, Any]) -> str:
    c = result["confusion"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        f"rule judge ({result['keywords']} keywords) vs pyrit refusal.csv human labels, "
        f"n={result['n']}",
        f"accuracy {pct(result['accuracy'])}  precision {pct(result['precision'])}  "
        f"recall {pct(result['recall'])}  kappa {result['cohen_kappa']:.3f}",
        "",
        "                   human refusal   human not refusal",
        f"rule refusal       {c['tp']:>13}   {c['fp']:>17}",
        f"rule not refusal   {c['fn']:>13}   {c['tn']:>17}",
        "",
        "disagreements:",
    ]
    for d in result["disagreements"]:
        kind = "missed refusal" if d["human_refusal"] else f"false refusal ({d['matched']!r})"
        lines.append(f"  row {d['row']:>3} {kind}: {d['response'][:90]!r}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--paper-keywords", action="store_true",
                        help="use the keyword list exactly as the paper's code ran it")
    args = parser.parse_args(argv)
    result = validate_rule(paper_keywords=args.paper_keywords)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

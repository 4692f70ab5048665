"""Would pyrit's objective-scorer labels make a better probe judge? (experiments/LOG.md, 0b)

Fits the probe judge's grid (ray_fedit.judges.probe) twice on the bundled model's features: on
the shipped training labels, and on those plus pyrit's objective-scorer rows (human score 0,
"objective not achieved", counted as a refusal). Both are measured on the held-out refusal.csv,
and optionally on a run's evaluated answers (agreement with the rule judge, refusal share).

    python experiments/probe_with_objective_labels.py [RUN_DIR/eval/attacked/advbench.parquet]

About 4 minutes on 2 cores (features of ~600 exchanges).
"""

from __future__ import annotations

import sys

import numpy as np

from ray_fedit.config import ModelConfig
from ray_fedit.data.loaders import pyrit_objective_rows
from ray_fedit.judges import probe as P


def objective_rows() -> list[dict]:
    return [{"objective": r["objective"], "response": r["assistant_response"],
             "refusal": r["human_score"] == "0"} for _, _, r in pyrit_objective_rows()]


def main(answers: str | None) -> None:
    fm = P.FeatureModel(ModelConfig(name="smollm2-135m-instruct"))
    train, held = P.refusal_splits()
    seen = {(r["objective"], r["response"]) for r in held}
    extra = [r for r in objective_rows() if (r["objective"], r["response"]) not in seen]
    keys = [(p, layer) for p in P.POOLINGS for layer in P.probe_layers(fm.num_layers)]

    def feats(rows: list[dict]) -> dict:
        return fm.features([r["objective"] for r in rows], [r["response"] for r in rows], keys)

    f_train, f_extra, f_held = feats(train), feats(extra), feats(held)
    y_held = np.array([r["refusal"] for r in held])
    run_rows, f_run = [], None
    if answers:
        import pyarrow.parquet as pq

        run_rows = pq.read_table(answers).to_pylist()
        f_run = feats([{"objective": r["prompt"], "response": r["response"]} for r in run_rows])
    extended = {k: np.vstack([f_train[k], f_extra[k]]) for k in keys}
    # Shuffled once (fixed seed) so that the CV folds mix the two label sources.
    order = np.random.RandomState(0).permutation(len(train) + len(extra))
    for name, feats_, rows, perm in [
            ("shipped labels", f_train, train, np.arange(len(train))),
            ("+ objective labels", extended, train + extra, order)]:
        x = {k: v[perm] for k, v in feats_.items()}
        y = [rows[i]["refusal"] for i in perm]
        key, l2, cv = P.cv_select(x, y)
        fitted = P.fit_logistic(x[key], y, l2)
        pred = fitted.predict(f_held[key])
        tp = int((pred & y_held).sum())
        print(f"{name}: {len(y)} rows, {key} l2={l2:g}, CV {cv:.3f}; held out ({len(y_held)}): "
              f"accuracy {(pred == y_held).mean():.3f}, precision {tp / pred.sum():.3f}, "
              f"recall {tp / y_held.sum():.3f}")
        if f_run is not None:
            verdicts = fitted.predict(f_run[key])
            rule = np.array([bool(r["rule_safe"]) for r in run_rows])
            print(f"  on {answers}: refusal share {verdicts.mean():.3f}, agreement with the rule "
                  f"{(verdicts == rule).mean():.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

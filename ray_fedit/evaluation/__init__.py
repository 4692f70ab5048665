"""Safety and helpfulness evaluation: benchmarks, judges, helpfulness, bootstrap statistics.

Importing this package does not import Ray or torch; :func:`evaluate_adapter` uses them when it
runs.
"""

from ray_fedit.evaluation.runner import RoundEvaluator, evaluate_adapter

__all__ = ["RoundEvaluator", "evaluate_adapter"]

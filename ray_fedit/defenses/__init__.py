"""Defenses applied after FedIT, registered by name in ``DEFENSES`` (``none`` skips the stage)."""

from ray_fedit.defenses import posthoc  # noqa: F401  (registers posthoc, pretrained)
from ray_fedit.defenses.posthoc import DefenseResult, finetune_adapter

__all__ = ["DefenseResult", "finetune_adapter"]

"""The generation package's exception."""

from __future__ import annotations

from ray_fedit.errors import RayFeditError


class GenerationError(RayFeditError):
    """An engine that cannot run (missing package or GPU) or a request that failed for good."""

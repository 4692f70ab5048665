"""The project's domain exceptions. Each names the bad value, the rule it broke and a fix."""

from __future__ import annotations


class RayFeditError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RayFeditError):
    """A config (YAML or override) that breaks a rule; raised before any Ray work starts."""


class DataError(RayFeditError):
    """A data file or row that cannot be read; the message names file:line."""


class AggregationError(RayFeditError):
    """An aggregation rule whose preconditions do not hold for this round's updates."""


class ClientFailure(RayFeditError):
    """A client task that failed and whose failure policy says to stop the run."""


class CheckpointError(RayFeditError):
    """A checkpoint that is corrupted or belongs to another config."""

"""The project's domain exceptions. Each names the bad value, the rule it broke and a fix."""

from __future__ import annotations

from pathlib import Path


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


class RunFailed(RayFeditError):
    """A stage of a run failed; the run directory keeps the full traceback and can be resumed.

    Attributes:
        stage: the stage that failed.
        cause: the exception it raised (a Ray task error is unwrapped to its cause).
        run_dir: the run directory (``ray-fedit run --resume RUN_DIR`` continues it).
        log: the file holding the full traceback.
    """

    def __init__(self, stage: str, cause: BaseException, run_dir: Path, log: Path) -> None:
        self.stage, self.cause, self.run_dir, self.log = stage, cause, run_dir, log
        super().__init__(f"stage {stage} failed: {one_line(cause)}")


def root_cause(e: BaseException) -> BaseException:
    """The user's exception behind Ray's wrappers (``RayTaskError.cause``, chained)."""
    seen = set()
    while getattr(e, "cause", None) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.cause  # type: ignore[attr-defined]
    return e


def one_line(e: BaseException) -> str:
    """``Type: message`` on one line: the exception's first non-empty message line."""
    e = root_cause(e)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else '(no message)'}"[:400]

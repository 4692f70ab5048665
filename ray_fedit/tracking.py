"""Experiment tracking: a run's config, rounds, evaluations and defense loss in TensorBoard,
MLflow or W&B (``output.trackers``; any subset, default none).

What is logged, by every backend alike:

- the resolved config (TensorBoard: as text; MLflow: flattened params; W&B: the run config);
- ``federation/<label>/<metric>`` per round (step = round), as each round lands in
  ``rounds.jsonl``: :func:`round_metrics` says which;
- ``eval/<stage>/<metric>`` after each evaluation (step = ``federation.rounds``): the headline
  of ``metrics.json`` (:func:`ray_fedit.evaluation.summary.flat_headline`);
- ``defense/loss`` per defense step;
- the report files and the resolved config as artifacts (TensorBoard: the report's Markdown as
  text).

Offline by default, everything under ``RUN_DIR/tracking/``: TensorBoard event files in
``tracking/tensorboard`` (``tensorboard --logdir RUN_DIR/tracking``); an MLflow file store in
``tracking/mlruns`` unless ``MLFLOW_TRACKING_URI`` names a server; W&B in offline mode in
``tracking/wandb`` unless ``WANDB_MODE=online`` (then ``wandb sync`` is not needed). The W&B
project is ``WANDB_PROJECT`` (default ``ray-fedit``); the MLflow experiment is ``output.name``.

The writers run in the process that runs the pipeline (the CLI, or a sweep trial's process), not
in the actors it starts. Sweeps log the trials' final metrics with Ray Tune's own callbacks
(:func:`tune_callbacks`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ray_fedit.errors import ConfigError

log = logging.getLogger(__name__)

# name -> (the module it imports, the pip extra that installs it)
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboardX", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


def check_available(names: Iterable[str]) -> None:
    """Raise :class:`ConfigError` naming the extra for each tracker whose package is missing."""
    missing = [(n, *BACKENDS[n]) for n in names if importlib.util.find_spec(BACKENDS[n][0]) is None]
    if missing:
        raise ConfigError("; ".join(
            f"output.trackers: {name!r} needs the {module!r} package, which is not installed; fix: "
            f"pip install 'ray-fedit[{extra}]' (or drop {name!r} from output.trackers)"
            for name, module, extra in missing))


# ------------------------------------------------------------------------------ what is logged
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def round_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one ``rounds.jsonl`` record.

    Every numeric top-level field (``mean_loss``, ``lr``, ``aggregate_norm``, ``seconds``,
    ``bytes``, ``retries``), the sizes of the client lists (``num_sampled``, ``num_aggregated``,
    ``num_rejected``, ``num_failed``), the aggregation weight the malicious clients got
    (``malicious_weight``, the attack's share of the round), the numeric ``aggregator_info`` entries
    (``aggregator/<key>``) and the round's evaluation (``round_eval/<key>``) when there is one.
    """
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("round", "rounds"):
            continue
        number = _number(value)
        if number is not None:
            out[key] = number
    for key in ("sampled", "aggregated", "rejected", "failed"):
        if isinstance(record.get(key), list):
            out[f"num_{key}"] = float(len(record[key]))
    clients = record.get("clients") or []
    if clients:
        out["malicious_weight"] = float(sum(c.get("weight") or 0.0 for c in clients
                                            if c.get("malicious")))
    for prefix, nested in (("aggregator", record.get("aggregator_info")),
                           ("round_eval", record.get("eval"))):
        if isinstance(nested, Mapping):
            for key, value in nested.items():
                number = _number(value)
                if number is not None:
                    out[f"{prefix}/{key}"] = number
    return out


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------------- backends
class _TensorBoard:
    def __init__(self, root: Path, name: str, run_name: str) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(root / "tensorboard"))

    def log_config(self, config: Mapping[str, Any], text: str) -> None:
        self.writer.add_text("config", f"```yaml\n{text}\n```", 0)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for path in paths:
            if path.suffix == ".md":
                self.writer.add_text(f"report/{path.name}", path.read_text(encoding="utf-8"), 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, root: Path, name: str, run_name: str) -> None:
        offline_defaults(["mlflow"])
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (root / "mlruns").resolve().as_uri()
        from mlflow.tracking import MlflowClient

        from ray_fedit import console

        console.quiet_libraries()  # mlflow gave its logger a terminal handler
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        log.info("mlflow: run %s in %s", self.run_id, uri)

    def log_config(self, config: Mapping[str, Any], text: str) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # the store's batch limit
            self.client.log_batch(self.run_id, params=params[i: i + 100])
        self.client.log_text(self.run_id, text, "resolved_config.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i: i + 1000])

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), "report")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    def __init__(self, root: Path, name: str, run_name: str) -> None:
        import wandb

        self._wandb = wandb
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ray-fedit"), group=name, name=run_name,
            dir=str(root), mode=os.environ.get("WANDB_MODE", "offline"), settings=_wandb_settings())
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log_config(self, config: Mapping[str, Any], text: str) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # W&B's own step must not go back, and a second federation's round 1 follows the first's
        # last round: our step is the metric ``step``, every other metric's x-axis.
        self.run.log({**metrics, "step": step})

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        artifact = self._wandb.Artifact(f"report-{self.run.id}", type="report")
        for path in paths:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


def _wandb_settings() -> Any:
    """W&B without its terminal lines, stdout capture or system-stats sampling."""
    import wandb

    return wandb.Settings(silent=True, console="off", x_disable_stats=True)


_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


# ------------------------------------------------------------------------------------- facade
class Trackers:
    """The run's trackers as one; with no names every call is a no-op.

    Args:
        names: ``output.trackers``.
        root: where offline files go (``RUN_DIR/tracking``).
        experiment: the experiment/group name (``output.name``).
        run_name: this run's name (the run directory's name).

    A backend that cannot start raises :class:`ConfigError` (before any stage runs); one that
    fails while logging is closed and dropped with a warning in the run log and on the terminal:
    tracking never ends a run that has started or loses what it computed.
    """

    def __init__(self, names: Sequence[str], root: Path, experiment: str, run_name: str) -> None:
        check_available(names)
        self.root = Path(root)
        self.backends: dict[str, Any] = {}
        for name in names:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                self.backends[name] = _CLASSES[name](self.root, experiment, run_name)
            except Exception as e:
                self.close()
                raise ConfigError(f"output.trackers: {name!r} could not start ({type(e).__name__}: "
                                  f"{e}); fix: check its environment variables (docs/tracking.md) "
                                  f"or drop it from output.trackers") from e

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _each(self, what: str, *args: Any) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, what)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker must not end the run
                log.warning("tracker %s failed in %s (%s: %s); it is dropped for this run",
                            name, what, type(e).__name__, e)
                self.backends.pop(name)
                try:
                    backend.close()
                except Exception:  # noqa: BLE001
                    pass

    def log_config(self, config: Mapping[str, Any], text: str) -> None:
        self._each("log_config", config, text)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numeric values of ``metrics`` (None, a judge that parsed nothing, is left out)."""
        numbers = {k: n for k, v in metrics.items() if (n := _number(v)) is not None}
        if numbers:
            self._each("log_metrics", numbers, int(step))

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        files = [Path(p) for p in paths if Path(p).is_file()]
        if files:
            self._each("log_artifacts", files)

    def round_logger(self, label: str) -> Callable[[Mapping[str, Any]], None] | None:
        """A callback for one federation's round records, or None without trackers."""
        if not self.backends:
            return None

        def on_round(record: Mapping[str, Any]) -> None:
            self.log_metrics({f"federation/{label}/{k}": v for k, v in round_metrics(record).items()},
                             int(record["round"]))
        return on_round

    def close(self) -> None:
        self._each("close")
        self.backends.clear()


def offline_defaults(names: Sequence[str]) -> None:
    """The environment the offline defaults need in this process: MLflow's file store must be
    asked for (MLflow 3.7+) and W&B's callback checks ``WANDB_MODE`` before any key. Call it
    before a restored sweep's callbacks (unpickled, not built here) start."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" in names and (not uri or uri.startswith("file:") or "://" not in uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store, ours or named
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")


def tune_callbacks(names: Sequence[str], storage: Path, experiment: str) -> list[Any]:
    """Ray Tune's own logger callbacks for ``names``, offline as for runs (under ``storage``)."""
    check_available(names)
    offline_defaults(names)
    callbacks: list[Any] = []
    for name in names:
        if name == "tensorboard" and os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS") == "1":
            # Tune writes TensorBoard event files into every trial's directory by default (its
            # automatic TBXLoggerCallback); only where that is switched off is one added.
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(TBXLoggerCallback())
        elif name == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            uri = (os.environ.get("MLFLOW_TRACKING_URI")
                   or (Path(storage) / "mlruns").resolve().as_uri())
            callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment))
            import mlflow  # noqa: F401 - its import gives its logger a terminal handler

            from ray_fedit import console

            console.quiet_libraries()
        elif name == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            callbacks.append(WandbLoggerCallback(
                project=os.environ.get("WANDB_PROJECT", "ray-fedit"), group=experiment,
                mode=os.environ["WANDB_MODE"], dir=str(storage), settings=_wandb_settings()))
    return callbacks

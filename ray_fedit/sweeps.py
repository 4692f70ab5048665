"""``ray-fedit sweep``: a Ray Tune grid whose trials are whole runs.

A sweep file names a base config, overrides for every trial, a grid of config keys and the seeds::

    # Run: ray-fedit sweep configs/sweeps/malicious_fraction.yaml
    name: malicious_fraction
    base: ../quickstart.yaml            # relative to this file
    overrides: [federation.rounds=3]
    grid:
      attack.malicious_fraction: [0.0, 0.1, 0.2, 0.3, 0.4]
      aggregator.name: [mean, median]
    seeds: [0, 1, 2]

Every trial's config is built and validated before Tune starts, so one bad grid point fails the sweep
at once. Each trial reserves its driver and worker bundles with ``tune.PlacementGroupFactory``, so the
actors a run starts are scheduled inside the trial's reservation.

Each trial's run directory is ``<output.root>/<name>/<timestamp>-<trial id>``, so concurrent trials
never share one, and it is the trial's Tune checkpoint: before its first stage a trial reports a
checkpoint that holds only the directory's path (``run.json``). ``--resume`` restores an interrupted
sweep with ``Tuner.restore``: finished trials are not rerun; unfinished and errored ones find their
run directory in that checkpoint and continue it like ``ray-fedit run --resume`` (stages already done
are skipped, the federation continues from its last checkpoint).

The base config's ``output.trackers`` give Tune its own logger callbacks (TensorBoard, MLflow, W&B;
``ray_fedit.tracking.tune_callbacks``), which log every trial's reported headline; each trial's run
also logs its rounds in its own run directory (docs/tracking.md).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ray_fedit.config import RunConfig, load_config
from ray_fedit.errors import ConfigError

if TYPE_CHECKING:
    from ray_fedit.resources import NodeCapacity
    from ray_fedit.rundir import RunDir

SWEEP_STATE = "sweep.json"
RUN_POINTER = "run.json"  # the file of a trial's Tune checkpoint: {"run_dir": absolute path}


class SweepFile(BaseModel):
    """The schema of a sweep YAML."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base: str = Field(description="base run config, relative to the sweep file")
    overrides: list[str] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(description="config key -> values; the cross product runs")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what fits the "
                                              "cluster's CPUs and GPUs")
    metric: str = Field("attacked.safety_rate", description="metric Tune reports as the objective")


@dataclass(frozen=True)
class Trial:
    """One grid point and seed: the overrides that build its config."""

    point: dict[str, Any]
    seed: int
    overrides: tuple[str, ...]
    config: RunConfig = field(compare=False, repr=False)

    @property
    def key(self) -> str:
        """Stable id of the grid point without the seed (groups seeds for CIs)."""
        return ",".join(f"{k}={_fmt(v)}" for k, v in sorted(self.point.items()))


def _fmt(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


@dataclass(frozen=True)
class Sweep:
    spec: SweepFile
    base: Path
    trials: list[Trial]


def load_sweep(path: str | Path, extra_overrides: Sequence[str] = ()) -> Sweep:
    """Read a sweep file and build and validate every trial's config.

    Raises:
        ConfigError: naming the sweep file, the grid point and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    try:
        spec = SweepFile.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigError(f"{path}: not a valid sweep file: {e}") from None
    base = (path.parent / spec.base).resolve()
    keys = sorted(spec.grid)
    for k in keys:
        if not spec.grid[k]:
            raise ConfigError(f"{path}: grid.{k} is empty; give at least one value")
    trials = []
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        for seed in spec.seeds:
            overrides = (*spec.overrides, *extra_overrides,
                         *(f"{k}={_fmt(v)}" for k, v in point.items()), f"seed={seed}",
                         f"output.name={spec.name}")
            try:
                cfg = load_config(base, overrides)
            except ConfigError as e:
                raise ConfigError(f"{path}: trial {point} seed {seed}: {e}") from None
            trials.append(Trial(point=point, seed=seed, overrides=overrides, config=cfg))
    return Sweep(spec=spec, base=base, trials=trials)


def trial_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """Resources one trial reserves with its placement group, for ``tune.PlacementGroupFactory``.

    The head bundle is empty: the trial's own process and the (CPU-free) federation driver only
    orchestrate, so Tune reserves no CPU for them and the trial's group holds the trainer workers'
    bundles at 0..n-1, where the worker pool looks for them
    (:func:`ray_fedit.resources.acquire_worker_placement`). Stages run one after another, so the
    generation actors and the evaluation's model task fit in the workers' bundles; only actors
    beyond the worker count get bundles of their own.
    """
    from ray_fedit.resources import worker_bundles

    gen = cfg.generation
    actor = {"CPU": 1.0, **({"GPU": gen.gpus_per_actor} if gen.gpus_per_actor else {})}
    extra = [actor] * max(0, gen.num_actors - cfg.resources.num_workers)
    return [{}, *worker_bundles(cfg.resources), *extra]


def outside_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """Resources a trial uses outside its reservation: Ray Train (the defense) places its workers
    with its own placement group, so concurrent trials must leave room for them."""
    from ray_fedit.resources import defense_worker_resources

    if cfg.defense.name == "none":
        return []
    return [defense_worker_resources(cfg.resources, cfg.defense.use_gpu)] * cfg.defense.num_workers


def check_trial_fits(cfg: RunConfig, nodes: Sequence[NodeCapacity]) -> None:
    """Refuse a sweep whose single trial can never run: its reservation and its defense's Ray Train
    workers (placed outside it) must fit the cluster together, or the defense waits forever for
    CPUs the trial itself holds.

    ``nodes`` are the cluster's alive nodes plus the groups its autoscaler may launch
    (:func:`ray_fedit.resources.cluster_nodes`); an unbounded group always fits.

    Raises:
        ConfigError: naming both parts of the request, what the cluster has, and a fix.
    """
    from ray_fedit.resources import format_resources, sum_bundles

    if any(n.count < 0 for n in nodes):
        return
    have = sum_bundles([{k: v * n.count for k, v in n.resources.items()} for n in nodes])
    reserved, outside = sum_bundles(trial_bundles(cfg)), sum_bundles(outside_bundles(cfg))
    need = sum_bundles([reserved, outside])
    short = [k for k, v in need.items() if v > have.get(k, 0.0) + 1e-9]
    if short:
        raise ConfigError(
            f"one trial of this sweep needs {format_resources(need)}: {format_resources(reserved)} "
            f"reserved for its run (resources.num_workers={cfg.resources.num_workers}, "
            f"generation.num_actors={cfg.generation.num_actors}) plus {format_resources(outside)} "
            f"for the defense's Ray Train workers, which Ray Train places outside the trial's "
            f"reservation (defense.num_workers={cfg.defense.num_workers}); the cluster has "
            f"{format_resources(have)} in all, too little {', '.join(short)}. fix: lower "
            "resources.num_workers or defense.num_workers, use defense.name=none, or add nodes")


def max_concurrent(bundles: list[dict[str, float]], cluster: dict[str, float]) -> int:
    """How many trials needing ``bundles`` each fit the cluster's current resources at once (at
    least 1: an autoscaler may add the rest; :func:`check_trial_fits` refuses what never fits)."""
    from ray_fedit.resources import sum_bundles

    fits = [math.floor(cluster.get(k, 0.0) / v) for k, v in sum_bundles(bundles).items() if v > 0]
    return max(1, min(fits) if fits else 1)


def flatten_metrics(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numeric results -> ``{"a.b.c": value}`` (what Tune records per trial)."""
    out: dict[str, float] = {}
    for k, v in summary.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def trial_run_dir(cfg: RunConfig, trial_id: str, timestamp: str | None = None) -> RunDir:
    """Create a trial's run directory, named by its trial id, and write its manifest (what
    :func:`ray_fedit.pipeline.run_pipeline` writes for a new run, plus ``sweep_trial_id``)."""
    from ray_fedit.pipeline import selected_stages
    from ray_fedit.rundir import RunDir, write_manifest

    run = RunDir.create(cfg, timestamp=timestamp, tag=trial_id)
    write_manifest(run, cfg, stages=selected_stages(cfg, None), sweep_trial_id=trial_id)
    return run


def _trainable(config: dict[str, Any]) -> None:
    import tempfile

    from ray import tune

    from ray_fedit.console import show_project_logs
    from ray_fedit.pipeline import resume_run, run_pipeline

    show_project_logs()  # the trial's progress and resume lines, as `ray-fedit run` shows them
    trial = config["trial"]
    ids = {"trial_key": trial["key"], "seed": trial["seed"]}
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        cfg = RunConfig.model_validate(trial["run_config"])
        run_dir = trial_run_dir(cfg, tune.get_context().get_trial_id()).root.resolve()
        # Tune copies the checkpoint to its storage before report() returns.
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / RUN_POINTER).write_text(json.dumps({"run_dir": str(run_dir)}))
            tune.report({**ids, "run_dir": str(run_dir)},
                        checkpoint=tune.Checkpoint.from_directory(tmp))
        summary = run_pipeline(cfg, run_dir=run_dir)
    else:
        with checkpoint.as_directory() as d:
            run_dir = Path(json.loads((Path(d) / RUN_POINTER).read_text())["run_dir"])
        print(f"trial {trial['key']} seed {trial['seed']}: resuming {run_dir}", flush=True)
        summary = resume_run(run_dir)
    tune.report(flatten_metrics(summary["metrics"]) | {**ids, "run_dir": summary["run_dir"]})


def run_sweep(path: Path, overrides: Sequence[str] = (), resume: str | None = None) -> Path:
    """Run (or resume) a sweep; returns the sweep directory with ``sweep_results.csv``."""
    import ray
    from ray import tune

    from ray_fedit.pipeline import ensure_ray
    from ray_fedit.report import write_sweep_report
    from ray_fedit.resources import cluster_nodes
    from ray_fedit.tracking import offline_defaults, tune_callbacks

    sweep = load_sweep(path, overrides)
    # Trials read data files relative to where the sweep was started (as `ray-fedit run` does), so
    # Tune must not move them into their trial directories; workers inherit this from the raylet a
    # local ray.init starts, and cluster/runtime_env.yaml sets it for `ray job submit`.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    storage = Path(sweep.trials[0].config.output.root).resolve() / "sweeps"
    sweep_dir = storage / sweep.spec.name
    print(f"sweep {sweep.spec.name}: {len(sweep.trials)} trials "
          f"({len(sweep.trials) // len(sweep.spec.seeds)} grid points x {len(sweep.spec.seeds)} seeds)")
    ensure_ray(forward_logs=True)  # each trial's stage, round and resume lines
    nodes = cluster_nodes()
    for trial in sweep.trials:
        check_trial_fits(trial.config, nodes)
    bundles = trial_bundles(sweep.trials[0].config)
    limit = sweep.spec.max_concurrent_trials or max_concurrent(
        bundles + outside_bundles(sweep.trials[0].config), ray.cluster_resources())
    trainable = tune.with_resources(_trainable, tune.PlacementGroupFactory(bundles))
    trackers = sweep.trials[0].config.output.trackers
    if resume:
        offline_defaults(trackers)  # the restored callbacks are the first run's
        if not tune.Tuner.can_restore(resume):
            raise ConfigError(f"--resume {resume!r}: no restorable sweep there")
        # Unfinished and errored trials continue their run directories (see the module docstring).
        tuner = tune.Tuner.restore(resume, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        param_space = {"trial": tune.grid_search([
            {"run_config": t.config.model_dump(mode="json"), "key": t.key, "seed": t.seed}
            for t in sweep.trials])}
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=limit),
            # num_to_keep makes Tune save the experiment state as soon as a trial reports its run
            # directory, so a sweep killed without warning (SIGKILL, a lost head) still finds it.
            run_config=tune.RunConfig(name=sweep.spec.name, storage_path=str(storage),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=tune_callbacks(trackers, storage,
                                                               sweep.spec.name)),
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_STATE).write_text(json.dumps({
        "sweep_file": str(Path(path).resolve()), "overrides": list(overrides),
        "trials": [{"key": t.key, "seed": t.seed, "overrides": list(t.overrides)} for t in sweep.trials],
    }, indent=2))
    results = tuner.fit()
    errors = [r for r in results if r.error]
    write_sweep_report(sweep_dir, [r.metrics or {} for r in results], metric=sweep.spec.metric)
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(results)} trials failed; first: {errors[0].error}; "
                           f"resume with: ray-fedit sweep {path} --resume {sweep_dir}")
    return sweep_dir

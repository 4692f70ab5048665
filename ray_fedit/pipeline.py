"""One ``ray-fedit run``: the stages of an experiment over its run directory.

    prepare            benign, aligned and attack data (generated with Ray Data or loaded),
                       held-out benign prompts, malicious client ids, client partitions
    federate           FedIT on Ray (driver actor + trainer workers); with
                       ``attack.compare_no_attack`` also the same federation without attackers
    evaluate           safety + helpfulness of the final global adapter(s)
    defend             post-hoc fine-tune of the attacked global adapter on defense data (Ray Train)
    evaluate_defended  safety + helpfulness of the defended adapter
    report             tables and plots

Each stage records its outputs in ``stages/<stage>.json`` with the config hash; a rerun or
``--resume`` skips stages already done for the same config, and an interrupted federation continues
from its last checkpoint. ``--stages`` runs a subset (earlier stages must be done).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_fedit import console, tracking
from ray_fedit.config import RunConfig, load_config
from ray_fedit.data.schema import Record, from_rows, to_table
from ray_fedit.errors import CheckpointError, ConfigError, RunFailed
from ray_fedit.evaluation.paired import paired_effects
from ray_fedit.evaluation.summary import (
    ATTACKED,
    DEFENDED,
    NO_ATTACK,
    collect_metrics,
    flat_headline,
    headline,
    summary_table,
)
from ray_fedit.rundir import RunDir, config_hash, update_manifest, write_json_atomic, write_manifest
from ray_fedit.tracking import Trackers

log = logging.getLogger(__name__)

STAGES = ("prepare", "federate", "evaluate", "defend", "evaluate_defended", "report")


# ------------------------------------------------------------------------------------- progress
@dataclass
class Progress:
    """One line per stage start and end, with elapsed time and an ETA from finished stages."""

    stages: Sequence[str]
    started: float = 0.0

    def begin(self, i: int, stage: str) -> float:
        if not self.started:
            self.started = time.perf_counter()
        print(f"[{i + 1}/{len(self.stages)} {stage}] started "
              f"(elapsed {self._fmt(time.perf_counter() - self.started)})", flush=True)
        return time.perf_counter()

    def end(self, i: int, stage: str, t0: float, note: str = "") -> None:
        spent = time.perf_counter() - t0
        print(f"[{i + 1}/{len(self.stages)} {stage}] done in {self._fmt(spent)}"
              f"{'; ' + note if note else ''}", flush=True)

    @staticmethod
    def _fmt(seconds: float) -> str:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m}m{s:02d}s" if m else f"{s}s"


# -------------------------------------------------------------------------------------- helpers
def _save_records(path: Path, records: list[Record], **columns: list[Any]) -> None:
    import pyarrow.parquet as pq

    table = to_table(records)
    for name, values in columns.items():
        table = table.append_column(name, [values])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _read_records(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def wants_dashboard(stages: Sequence[str]) -> bool:
    """Whether a private local Ray for ``stages`` starts the dashboard.

    Only the defense stage needs it: Ray Train's placement-group cleaner queries the state API
    the dashboard serves, and without it logs a warning every few seconds. Everything else runs
    without, which saves most of ``ray.init`` (``benchmarks/ray_init.py``; docs/federation.md).
    ``RAY_FEDIT_DASHBOARD=1`` or ``=0`` forces it on or off.
    """
    import os

    forced = os.environ.get("RAY_FEDIT_DASHBOARD")
    if forced in ("0", "1"):
        return forced == "1"
    return "defend" in stages


def ensure_ray(stages: Sequence[str] = STAGES, *, forward_logs: bool | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` (set by ``ray job submit``; ``auto`` joins a running head), or
    start a private local instance for ``stages`` (with the dashboard when
    :func:`wants_dashboard`); quiet Ray Data's per-dataset progress logs.

    ``forward_logs``: print the actors' output here (Ray's ``log_to_driver``); default only when
    verbose. A sweep forwards its trials' lines, which are its progress.
    """
    import os

    import ray

    console.quiet_libraries()  # importing Ray gave its logger a terminal handler again
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        extra = {"include_dashboard": wants_dashboard(stages)} if address == "local" else {}
        # Actor output goes to the Ray session's logs (RUN_DIR/logs/ray) unless -v.
        forward = console.verbose() if forward_logs is None else forward_logs
        ray.init(address=address, log_to_driver=forward, configure_logging=False, **extra)
    # Ray Data's per-dataset progress logs drown the run's own progress lines; keep its warnings.
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _pool(cfg: RunConfig, kind: str, sources: Sequence[Any], note: dict[str, Any],
          adapter_dir: Path | None = None) -> list[Record]:
    """Records of one data pool: generated pools via the generation pipeline, others loaded.

    A prompt-only source (a packaged benchmark, or ``response_field: null``) is valid only as
    ``attack.data``: the attack pipeline answers its harmful questions (MaliciousGen's answer step
    on given questions).
    """
    from ray_fedit.data.loaders import load_source, package_has_responses
    from ray_fedit.generation import generate_dataset

    records: list[Record] = []
    for src in sources:
        if src.kind == "generated" and src.path != kind:
            raise ConfigError(f"a generated source in the {kind} pool must have path {kind!r}, "
                              f"got {src.path!r}")
        prompt_only = ((src.kind == "package" and not package_has_responses(src.path))
                       or (src.kind not in ("generated", "package") and src.response_field is None))
        if prompt_only and kind != "attack":
            raise ConfigError(f"{kind} source {src.path!r} holds prompts only ({src.kind}, response_"
                              f"field {src.response_field}); {kind} data needs responses: use a source"
                              " with a response field, or a generated one")
        if src.kind == "generated" or prompt_only:
            data = generate_dataset(kind, cfg, adapter_dir=adapter_dir)
            note.setdefault("generated", {})[kind] = {
                "path": str(data.path), "cache_hit": data.cache_hit, "rows": len(data.records),
                "stats": data.stats, "sources": data.sources, "eval_sources_kept_out":
                data.eval_sources}
            records += data.records
        else:
            result = load_source(src, cfg.data.on_bad_row)
            note.setdefault("loaded", {})[f"{kind}:{src.path}"] = {
                "rows": len(result.records), "skipped": len(result.skipped)}
            records += result.records
    return records


def _heldout_benign(cfg: RunConfig) -> list[Record]:
    """Held-out benign (instruction, reference response) pairs that no client trains on.

    From ``evaluation.benign`` when set; otherwise the held-out seed instructions, with the base
    model's answers as references.
    """
    from ray_fedit.data.loaders import load_source
    from ray_fedit.data.schema import make_record
    from ray_fedit.generation.engine import generate
    from ray_fedit.generation.seeds import split_seed_instructions

    if cfg.evaluation.num_benign_prompts == 0:
        return []
    if cfg.evaluation.benign is not None:
        return load_source(cfg.evaluation.benign, cfg.data.on_bad_row).records
    _, held = split_seed_instructions(cfg.evaluation.num_benign_prompts)
    answered = generate(held, prompt_field="instruction", model_cfg=cfg.model, gen_cfg=cfg.generation,
                        template=cfg.data.template, seed=cfg.seed, progress="held-out benign: answers")
    return [make_record(a["instruction"], a["response"], source="seed_heldout", meta=a["meta"])
            for a in answered if a["response"].strip()]


def _check_disjoint(train: list[Record], cfg: RunConfig) -> dict[str, Any]:
    """Exact overlap between training instructions and evaluation prompts (must be none)."""
    from ray_fedit.evaluation.benchmarks import load_benchmark

    def key(text: str) -> str:
        return text.strip().lower()

    train_source = {key(r["instruction"]): r["source"] for r in train}
    report: dict[str, Any] = {}
    for bench in cfg.evaluation.benchmarks:
        prompts, _ = load_benchmark(bench, default_seed=cfg.seed)
        hits = [p["instruction"] for p in prompts if key(p["instruction"]) in train_source]
        report[bench.name] = {"prompts": len(prompts), "overlap_with_training": len(hits)}
        if hits:
            sources = sorted({train_source[key(h)] for h in hits})
            raise ConfigError(
                f"{len(hits)} evaluation prompts of {bench.name} are in the training data (from "
                f"{', '.join(sources)}; e.g. {hits[0][:60]!r}); keep evaluation benchmarks out of "
                "data sources (generated data stays cached for the next run)")
    return report


# --------------------------------------------------------------------------------------- stages
def stage_prepare(cfg: RunConfig, run: RunDir, done: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from ray_fedit.data.partition import build_clients, choose_malicious

    note: dict[str, Any] = {}
    normal = _pool(cfg, "benign", cfg.data.benign, note)
    aligned = _pool(cfg, "aligned", cfg.data.aligned, note) if cfg.data.aligned_fraction > 0 else []
    attack = _pool(cfg, "attack", [cfg.attack.data], note) if cfg.num_malicious > 0 else []
    heldout = _heldout_benign(cfg)
    malicious = choose_malicious(cfg.federation.num_clients, cfg.num_malicious,
                                 np.random.default_rng([cfg.seed, 7]))
    common = {"normal": normal, "aligned": aligned, "num_clients": cfg.federation.num_clients,
              "samples_per_client": cfg.data.samples_per_client,
              "aligned_fraction": cfg.data.aligned_fraction, "partition": cfg.data.partition,
              "dirichlet_alpha": cfg.data.dirichlet_alpha, "seed": cfg.seed}
    clients = build_clients(attack=attack, malicious_ids=malicious, **common)
    _save_clients(run.data / "clients.parquet", clients)
    if cfg.attack.compare_no_attack:
        # Paired: the same benign shards; the attackers' slots hold their benign shards.
        clean = build_clients(attack=[], malicious_ids=[], **common)
        _save_clients(run.data / "clients_no_attack.parquet", clean)
    _save_records(run.data / "benign_eval.parquet", heldout)
    disjoint = _check_disjoint(normal + aligned + attack, cfg)
    update_manifest(run, malicious_ids=malicious, data=note, evaluation_disjointness=disjoint)
    print(f"  {len(normal)} normal, {len(aligned)} aligned, {len(attack)} attack records; "
          f"malicious clients {malicious}; {len(heldout)} held-out benign prompts", flush=True)
    return {"malicious_ids": malicious, "rows": {"normal": len(normal), "aligned": len(aligned),
                                                 "attack": len(attack), "heldout": len(heldout)}}


def _save_clients(path: Path, clients: list[list[Record]]) -> None:
    flat = [r for c in clients for r in c]
    ids = [i for i, c in enumerate(clients) for _ in c]
    _save_records(path, flat, client_id=ids)


def _load_clients(path: Path, num_clients: int) -> list[list[Record]]:
    rows = _read_records(path)
    clients: list[list[Record]] = [[] for _ in range(num_clients)]
    for row, rec in zip(rows, from_rows(rows), strict=True):
        clients[row["client_id"]].append(rec)
    return clients


def _federate(cfg: RunConfig, run: RunDir, clients_file: Path, malicious: list[int],
              resume: bool, pool: Any, label: str, sampling_strata: list[int] | None = None,
              on_round: Callable[[dict[str, Any]], None] | None = None) -> str:
    from ray_fedit.federation import ClientSpec, run_federation

    clients = _load_clients(clients_file, cfg.federation.num_clients)
    specs = [ClientSpec(client_id=i, shard=c, is_malicious=i in malicious)
             for i, c in enumerate(clients)]
    eval_hook = None
    if cfg.federation.eval_every:
        from ray_fedit.evaluation import RoundEvaluator

        eval_hook = RoundEvaluator(cfg, run.root / "eval",
                                   benign_records=from_rows(_read_records(run.data / "benign_eval.parquet")))
    has_state = (run.checkpoints).is_dir() and any(run.checkpoints.iterdir())
    progress = console.RoundProgress(run.rounds, cfg.federation.rounds, label=label,
                                     on_record=on_round)
    try:
        result = run_federation(cfg, run, specs, eval_hook=eval_hook, resume=resume and has_state,
                                sampling_strata=sampling_strata, pool=pool, on_wait=progress.poll)
    finally:
        progress.close()
    if result.adapter_dir is None:
        raise CheckpointError(f"federation in {run.root} stopped after {result.rounds_completed} rounds")
    return str(result.adapter_dir)


def stage_federate(cfg: RunConfig, run: RunDir, done: dict[str, Any], resume: bool = False,
                   trackers: Trackers | None = None) -> dict[str, Any]:
    from ray_fedit.federation import WorkerPool

    malicious = done["prepare"]["malicious_ids"]
    track = trackers.round_logger if trackers else (lambda label: None)
    # One pool for both federations: the workers read no attack settings, so they load the
    # model once and the no-attack run gets the same bits as on a pool of its own.
    with WorkerPool(cfg) as pool:
        out = {ATTACKED: _federate(cfg, run, run.data / "clients.parquet", malicious, resume,
                                   pool, ATTACKED, on_round=track(ATTACKED))}
        if cfg.attack.compare_no_attack:
            out[NO_ATTACK] = _federate(no_attack_config(cfg), RunDir(run.root / NO_ATTACK),
                                       run.data / "clients_no_attack.parquet", [], resume, pool,
                                       NO_ATTACK, sampling_strata=malicious,
                                       on_round=track(NO_ATTACK))
    return {"adapters": out}


def no_attack_config(cfg: RunConfig) -> RunConfig:
    """The paired reference federation without attackers (the paper's 'FedAvg (No Attack)').

    Everything but the attack is the attacked run's: the same aggregator with the same resolved
    ``f`` (``f: expected`` would otherwise resolve to 0 and turn Multi-Krum, Bulyan or DnC into
    the mean), the same seed and so the same sampling stream. The attacked run's malicious clients
    are benign here, holding the benign shards the partition gives them (``build_clients``).
    """
    from ray_fedit.aggregators import accepted_params

    aggregator = cfg.aggregator
    if "f" in accepted_params(aggregator.name) and cfg.assumed_attackers is not None:
        aggregator = aggregator.model_copy(update={"f": cfg.assumed_attackers})
    return cfg.model_copy(update={"aggregator": aggregator, "attack": cfg.attack.model_copy(
        update={"malicious_fraction": 0.0, "update": cfg.attack.update.model_copy(
            update={"name": "none"})})})


def _evaluate(cfg: RunConfig, run: RunDir, adapters: dict[str, str | None]) -> dict[str, Any]:
    from ray_fedit.evaluation import evaluate_adapter

    benign = from_rows(_read_records(run.data / "benign_eval.parquet"))
    out = {}
    for stage, adapter in adapters.items():
        # resume: a rerun of the stage (after a judge failed) judges the responses it left
        metrics = evaluate_adapter(cfg, stage=stage, adapter_dir=Path(adapter) if adapter else None,
                                   out_dir=run.eval(stage), benign_records=benign, resume=True)
        out[stage] = str(run.eval(stage) / "metrics.json")
        print(f"  {stage}: {headline(metrics)}", flush=True)
    return {"metrics": out}


def stage_evaluate(cfg: RunConfig, run: RunDir, done: dict[str, Any]) -> dict[str, Any]:
    adapters = dict(done["federate"]["adapters"])
    if cfg.evaluation.include_base:
        adapters = {"base": None, **adapters}
    return _evaluate(cfg, run, adapters)


def stage_defend(cfg: RunConfig, run: RunDir, done: dict[str, Any]) -> dict[str, Any]:
    from ray_fedit.generation import generate_dataset
    from ray_fedit.registry import DEFENSES

    attacked = Path(done["federate"]["adapters"][ATTACKED])
    data = generate_dataset("defense", cfg, adapter_dir=attacked if cfg.defense.level == 3 else None)
    update_manifest(run, defense_data={"path": str(data.path), "rows": len(data.records),
                                       "cache_hit": data.cache_hit, "stats": data.stats})
    n_aligned = sum(r["is_harmful"] for r in data.records)
    print(f"  defense data: {len(data.records)} rows ({n_aligned} aligned), level {cfg.defense.level}"
          f"{' (cached)' if data.cache_hit else ''}", flush=True)
    result = DEFENSES.get(cfg.defense.name)(cfg, data.records, global_adapter=attacked,
                                            out_dir=run.root / "defense")
    return {"adapter": str(result.adapter_dir),
            "checkpoints": {str(k): str(v) for k, v in result.checkpoints.items()},
            "final_loss": result.losses[-1] if result.losses else None,
            "losses": list(result.losses),
            "resumed_after": result.resumed_after}  # steps after which a lost worker resumed


def stage_evaluate_defended(cfg: RunConfig, run: RunDir, done: dict[str, Any]) -> dict[str, Any]:
    adapters: dict[str, str | None] = {DEFENDED: done["defend"]["adapter"]}
    if cfg.defense.evaluate_checkpoints:  # the steps ablation: every saved step but the last
        for step, path in done["defend"]["checkpoints"].items():
            if path != done["defend"]["adapter"]:
                adapters[f"defended_step_{int(step):04d}"] = path
    return _evaluate(cfg, run, adapters)


def stage_report(cfg: RunConfig, run: RunDir, done: dict[str, Any]) -> dict[str, Any]:
    from ray_fedit.report import write_report

    paths = write_report(run.root)
    return {"files": [str(p) for p in paths]}


STAGE_FNS: dict[str, Callable[..., dict[str, Any]]] = {
    "prepare": stage_prepare, "federate": stage_federate, "evaluate": stage_evaluate,
    "defend": stage_defend, "evaluate_defended": stage_evaluate_defended, "report": stage_report,
}


# ------------------------------------------------------------------------------------ the runner
def selected_stages(cfg: RunConfig, stages: Sequence[str] | None) -> list[str]:
    """The stages to run, in pipeline order; ``defense.name: none`` drops the defense stages."""
    if stages:
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ConfigError(f"--stages: unknown {unknown}; known: {', '.join(STAGES)}")
    chosen = [s for s in STAGES if not stages or s in stages]
    if cfg.defense.name == "none":
        chosen = [s for s in chosen if s not in ("defend", "evaluate_defended")]
    return chosen


def _marker(run: RunDir, stage: str) -> Path:
    return run.root / "stages" / f"{stage}.json"


def load_done(run: RunDir, cfg: RunConfig) -> dict[str, Any]:
    """Outputs of the stages already done in this run directory for this config."""
    done = {}
    for stage in STAGES:
        path = _marker(run, stage)
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("config_hash") != config_hash(cfg):
                raise CheckpointError(f"{path} was written for another config (hash "
                                      f"{data.get('config_hash')} != {config_hash(cfg)}); start a "
                                      "new run instead of resuming this one")
            done[stage] = data["outputs"]
    return done


_FILE_KINDS = ("jsonl", "csv", "parquet")


def preflight(cfg: RunConfig, stages: Sequence[str]) -> None:
    """The checks that run before a run directory exists or Ray starts: the local data files
    ``stages`` read (:func:`check_data_files`) and the packages of ``output.trackers``."""
    check_data_files(cfg, stages)
    tracking.check_available(cfg.output.trackers)


def check_data_files(cfg: RunConfig, stages: Sequence[str]) -> None:
    """Read every local data file (jsonl, csv, parquet) that ``stages`` will read, as they read it.

    A bad file is bad input, like a bad config: it stops the run before a run directory exists or
    Ray starts, with a :class:`DataError` naming the file (and line). The stages read the files
    again; a second read of a local file costs seconds at most, next to minutes of stages. Hub
    datasets are left to the stages (a download is not a check).

    Raises:
        DataError: for a malformed row (under ``data.on_bad_row: raise``), an unreadable file, or
            a file that gives no records.
    """
    from ray_fedit.config import DataSourceConfig
    from ray_fedit.data.loaders import OnBadRow, load_source
    from ray_fedit.evaluation.helpfulness import load_mt_bench

    policy = cfg.data.on_bad_row
    reads: list[tuple[DataSourceConfig, OnBadRow]] = []  # with the policy the stage reads it with
    if "prepare" in stages:
        reads += [(s, policy) for s in cfg.data.benign]
        if cfg.data.aligned_fraction > 0:
            reads += [(s, policy) for s in cfg.data.aligned]
        if cfg.num_malicious > 0:
            reads.append((cfg.attack.data, policy))
        if cfg.evaluation.benign is not None and cfg.evaluation.num_benign_prompts > 0:
            reads.append((cfg.evaluation.benign, policy))
    if "prepare" in stages or "defend" in stages:
        reads += [(s, "raise") for s in cfg.generation.harmful_sources]
    if "defend" in stages and cfg.defense.level == 1:
        reads += [(s, "raise") for s in cfg.defense.public]
    evaluates = any(s.startswith("evaluate") for s in stages)
    if "prepare" in stages or evaluates:  # prepare checks training data against the benchmarks
        reads += [(b.source, "raise") for b in cfg.evaluation.benchmarks if b.source is not None]
    for src, on_bad_row in reads:
        if src.kind in _FILE_KINDS:
            load_source(src, on_bad_row)
    mt_bench = cfg.evaluation.mt_bench
    if evaluates and mt_bench is not None and mt_bench.kind in _FILE_KINDS:
        load_mt_bench(mt_bench)


def run_pipeline(cfg: RunConfig, stages: Sequence[str] | None = None, *,
                 run_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Run the selected stages; return ``{"run_dir", "metrics"}`` (metrics by stage label).

    Raises:
        ConfigError: for unknown stages or a stage whose inputs were never produced.
        DataError: for a bad local data file, before the run directory is created or Ray starts.
        CheckpointError: when resuming a directory written for another config.
        RunFailed: when a stage fails (or is interrupted); its traceback is in
            ``<run_dir>/logs/error.log`` and ``ray-fedit run --resume <run_dir>`` continues it.
    """
    chosen = selected_stages(cfg, stages)
    existing = None if run_dir is None else RunDir(Path(run_dir))
    done = {} if existing is None else load_done(existing, cfg)
    preflight(cfg, [s for s in chosen if s not in done])
    if existing is None:
        run = RunDir.create(cfg)
        write_manifest(run, cfg, stages=chosen)
    else:
        run = existing
    print(f"run directory: {run.root}", flush=True)
    console.log_to_run_dir(run.root)
    ensure_ray([s for s in chosen if s not in done])
    console.link_ray_logs(run.root)
    progress = Progress(chosen)
    # A resume starts a tracker run of its own, holding the stages it runs (none: no tracker run).
    todo = [s for s in chosen if s not in done]
    trackers = Trackers(cfg.output.trackers if todo else [], run.root / "tracking",
                        cfg.output.name, run.root.name)
    trackers.log_config(cfg.model_dump(mode="json"), cfg.to_yaml())
    try:
        for i, stage in enumerate(chosen):
            if stage in done:
                print(f"[{i + 1}/{len(chosen)} {stage}] already done; skipped", flush=True)
                continue
            missing = [s for s in STAGES[: STAGES.index(stage)] if s in _needs(stage) and s not in done]
            if missing:
                raise ConfigError(f"stage {stage!r} needs {missing} first; run them (or all stages)")
            t0 = progress.begin(i, stage)
            fn = STAGE_FNS[stage]
            try:
                outputs = (fn(cfg, run, done, resume=resume, trackers=trackers)
                           if stage == "federate" else fn(cfg, run, done))
            except (Exception, KeyboardInterrupt) as e:
                raise RunFailed(stage, e, run.root, _log_failure(run, stage, e)) from e
            write_json_atomic(_marker(run, stage), {"config_hash": config_hash(cfg), "outputs": outputs,
                                                    "seconds": round(time.perf_counter() - t0, 1)})
            done[stage] = outputs
            _track_stage(trackers, cfg, run, stage, outputs)
            progress.end(i, stage, t0)
    finally:
        from ray_fedit.generation import resident

        resident.release()  # the run's generation actor; the next run loads its own
        trackers.close()
    metrics = collect_metrics(run.root / "eval")
    if metrics:
        effects = paired_effects(run.root / "eval", samples=cfg.evaluation.bootstrap_samples,
                                 confidence=cfg.evaluation.confidence)
        print("\n" + summary_table(metrics, effects), flush=True)
    page = run.root / "report" / "report.html"
    if "report" in done and page.is_file():
        print(f"\nreport: {page}", flush=True)
    return {"run_dir": str(run.root), "metrics": {k: flat_headline(v) for k, v in metrics.items()}}


def _track_stage(trackers: Trackers, cfg: RunConfig, run: RunDir, stage: str,
                 outputs: dict[str, Any]) -> None:
    """What a finished stage gives the trackers (rounds went to them as they landed). A failure
    here is a warning: the stage's outputs are written and stay the record."""
    if not trackers:
        return
    try:
        _stage_to_trackers(trackers, cfg, run, stage, outputs)
    except Exception as e:  # noqa: BLE001 - tracking must not end a run
        log.warning("trackers: %s's outputs were not logged (%s: %s)", stage, type(e).__name__, e)


def _stage_to_trackers(trackers: Trackers, cfg: RunConfig, run: RunDir, stage: str,
                       outputs: dict[str, Any]) -> None:
    if stage in ("evaluate", "evaluate_defended"):
        for label, path in outputs["metrics"].items():
            metrics = json.loads(Path(path).read_text())
            trackers.log_metrics({f"eval/{label}/{k}": v for k, v in flat_headline(metrics).items()},
                                 cfg.federation.rounds)
    elif stage == "defend":
        for step, loss in enumerate(outputs.get("losses") or [], start=1):
            trackers.log_metrics({"defense/loss": loss}, step)
    elif stage == "report":
        trackers.log_artifacts([Path(p) for p in outputs["files"]] + [run.config_path])


def _log_failure(run: RunDir, stage: str, e: BaseException) -> Path:
    """Append the failure's full traceback to ``<run>/logs/error.log``; return that path."""
    import traceback

    log = run.root / "logs" / "error.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} stage {stage} failed\n")
        f.write("".join(traceback.format_exception(e)))
    return log


def _needs(stage: str) -> set[str]:
    return {"prepare": set(), "federate": {"prepare"}, "evaluate": {"federate"},
            "defend": {"federate"}, "evaluate_defended": {"defend"}, "report": set()}[stage]


def resume_run(run_dir: Path, stages: Sequence[str] | None = None) -> dict[str, Any]:
    """Continue a run from its directory: the resolved config there is the config."""
    config = Path(run_dir) / "resolved_config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no resolved_config.yaml)")
    cfg = load_config(config)
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    if manifest.get("config_hash") != config_hash(cfg):
        raise CheckpointError(f"{config} does not match the hash in manifest.json; it was edited "
                              "after the run started")
    return run_pipeline(cfg, stages, run_dir=Path(run_dir), resume=True)


# -------------------------------------------------------------------------------------- metrics
# ------------------------------------------------------------------------- generate / evaluate
def generate_command(cfg: RunConfig, kind: str, *, out: str | None, adapter: str | None) -> None:
    from ray_fedit.generation import generate_dataset

    ensure_ray(stages=())
    data = generate_dataset(kind, cfg, out_dir=out, adapter_dir=adapter)  # type: ignore[arg-type]
    print(f"{kind}: {len(data.records)} rows -> {data.path}{' (cache hit)' if data.cache_hit else ''}")
    print(json.dumps(data.stats, indent=2, default=str))


HELDOUT_FILE = "heldout_benign.parquet"


def evaluate_command(cfg: RunConfig, *, adapter: str | None, out: str | None,
                     overwrite: bool = False, resume: str | None = None) -> Path:
    """``ray-fedit evaluate``: evaluate ``adapter`` (None: the base model) into a directory of its own.

    By default the directory is new, ``<output.root>/eval/<adapter name>/<timestamp>`` (``-2``, ...
    when taken), so no evaluation overwrites another. ``out`` names it instead; a non-empty one is
    refused unless ``overwrite`` (this evaluation's files replace theirs; other files stay).
    ``resume`` names the directory of an evaluation that failed after generating (a judge down, an
    OOM): its saved responses and held-out benign records are judged without calling the engine.
    The directory is printed before the evaluation starts, so a failed one can be resumed.

    Returns:
        The directory the results went to.

    Raises:
        ConfigError: for a non-empty ``out`` without ``overwrite``, ``resume`` with ``out`` or
            ``overwrite``, or a ``resume`` directory without saved responses; all before Ray starts.
    """
    from ray_fedit.evaluation import evaluate_adapter
    from ray_fedit.evaluation.runner import RESPONSES_FILE

    label = Path(adapter).name if adapter else "base"
    out_dir: Path | None = None
    if resume is not None:
        if out is not None or overwrite:
            raise ConfigError("--resume DIR continues DIR; drop --out and --overwrite")
        out_dir = Path(resume)
        if not (out_dir / RESPONSES_FILE).is_file():
            raise ConfigError(f"--resume {out_dir}: no {RESPONSES_FILE} there, so no responses to "
                              "judge; evaluate without --resume")
    elif out is not None:
        out_dir = Path(out)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out {out_dir} is a file; name a directory")
        if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
            raise ConfigError(f"--out {out_dir} exists and is not empty; pass --overwrite to write "
                              f"this evaluation over it, --resume {out_dir} to finish the one there, "
                              "or name another directory")
    check_data_files(cfg, ["evaluate"])
    ensure_ray(stages=())
    if resume is not None and (Path(resume) / HELDOUT_FILE).is_file():
        target = Path(resume)
        benign = from_rows(_read_records(target / HELDOUT_FILE))
    else:
        benign = _heldout_benign(cfg)
        target = out_dir or _fresh_dir(Path(cfg.output.root) / "eval" / label)
        _save_records(target / HELDOUT_FILE, benign)
    print(f"evaluation directory: {target}", flush=True)
    metrics = evaluate_adapter(cfg, stage=label, adapter_dir=Path(adapter) if adapter else None,
                               out_dir=target, benign_records=benign, resume=resume is not None)
    print(f"{label}: {headline(metrics)}\nwritten to {target}")
    return target


def _fresh_dir(parent: Path) -> Path:
    """Create and return ``parent/<timestamp>``, or ``<timestamp>-2``, ... when that is taken."""
    from datetime import datetime
    from itertools import count

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in count(1):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")

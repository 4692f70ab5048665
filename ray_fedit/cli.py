"""The ``ray-fedit`` command line: run | sweep | generate | evaluate | report | export | ls | cp |
validate | doctor.

Configs are YAML files plus ``key=value`` overrides (``federation.rounds=5 aggregator.name=krum``).
Every config is validated before Ray starts; a bad one exits with code 2 and one line per problem.
A bad data file (``DataError``: a malformed row, an unreadable or empty file) also exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ray_fedit.errors import ConfigError, DataError, RayFeditError, RunFailed, root_cause

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ray-fedit",
        description="Federated instruction tuning of LLMs on Ray: safety attack, robust "
        "aggregators, post-hoc defense, evaluation.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show everything on the terminal"
                   ": actor output, library logs and warnings (default: RUN_DIR/logs/)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one experiment (prepare, federate, evaluate, defend, "
                         "evaluate, report)")
    run.add_argument("config", nargs="?", help="YAML config (omit with --resume)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. federation.rounds=5")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--stages", help="comma-separated subset of: prepare, federate, "
                     "evaluate_attacked, defend, evaluate_defended, report")

    sweep = sub.add_parser("sweep", help="Ray Tune grid of runs (malicious fraction x aggregator x"
                           " defense level x seed)")
    sweep.add_argument("sweep", help="sweep YAML")
    sweep.add_argument("overrides", nargs="*", help="overrides applied to every trial")
    sweep.add_argument("--resume", metavar="SWEEP_DIR", help="restore an interrupted sweep")

    gen = sub.add_parser("generate", help="run one data pipeline alone")
    gen.add_argument("kind", choices=["attack", "defense", "benign", "aligned"])
    gen.add_argument("config")
    gen.add_argument("overrides", nargs="*")
    gen.add_argument("--out", metavar="DIR", help="output directory (default: the data cache)")
    gen.add_argument("--adapter", metavar="DIR", help="PEFT adapter of the generator "
                     "(defense level 3: the attacked global adapter)")

    ev = sub.add_parser("evaluate", help="evaluate a saved adapter (or the base model)")
    ev.add_argument("config")
    ev.add_argument("overrides", nargs="*")
    ev.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory (omit: base model)")
    ev.add_argument("--out", metavar="DIR", help="output directory, new or empty (default: a new "
                    "OUTPUT_ROOT/eval/<adapter name>/<timestamp>)")
    ev.add_argument("--overwrite", action="store_true", help="write over a non-empty --out DIR")
    ev.add_argument("--resume", metavar="DIR", help="judge the responses an evaluation that failed "
                    "saved in DIR, without generating them again")

    rep = sub.add_parser("report", help="tables and plots of a run or sweep directory")
    rep.add_argument("directory")

    exp = sub.add_parser("export", help="a run's adapter as a PEFT directory, or merged into a "
                         "standalone transformers model (--merge)")
    exp.add_argument("run_dir", metavar="RUN_DIR")
    exp.add_argument("dest", metavar="DEST", help="new or empty output directory")
    exp.add_argument("--stage", default="defended", choices=["attacked", "no_attack", "defended"],
                     help="which adapter (default: defended)")
    exp.add_argument("--merge", action="store_true", help="merge the LoRA delta into the base "
                     "model's weights (safetensors, tokenizer and chat template included)")

    ls = sub.add_parser("ls", help="shipped configs and registered aggregators, attacks, "
                        "defenses, judges and datasets, one line each")
    ls.add_argument("kind", nargs="?", choices=["configs", "aggregators", "attacks", "defenses",
                                                 "judges", "datasets"], help="one kind only")

    cp = sub.add_parser("cp", help="copy a shipped config to edit (names: ray-fedit ls configs)")
    cp.add_argument("name", help="e.g. quickstart, sweeps/aggregators, deepspeed/zero3")
    cp.add_argument("dest", metavar="DEST", help="file or existing directory")
    cp.add_argument("--force", action="store_true", help="overwrite DEST")

    val = sub.add_parser("validate", help="every load-time check of a config (and its data "
                         "files), without running it")
    val.add_argument("config")
    val.add_argument("overrides", nargs="*")
    val.add_argument("--stages", help="check the data files these stages read (default: all)")

    doc = sub.add_parser("doctor", help="versions, devices, Ray resources, offline assets")
    doc.add_argument("--address", help="Ray cluster to inspect (default: start a local one)")
    doc.add_argument("--no-ray", action="store_true", help="skip starting Ray")
    return p


def _load(config: str | None, overrides: Sequence[str]):  # noqa: ANN202
    from ray_fedit.config import load_config

    return load_config(config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ray-fedit`` and ``python -m ray_fedit``; returns the exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if any(e in ("-v", "--verbose") for e in extra):  # also accepted after the command
        args.verbose = True
        extra = [e for e in extra if e not in ("-v", "--verbose")]
    # argparse stops collecting positional overrides at the first option (`run C --stages x a=b`):
    # overrides after options are still overrides; anything else is an error.
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from ray_fedit import console

    console.set_verbose(args.verbose or console.verbose())
    console.quiet_libraries()
    _show_progress_logs()
    try:
        return _dispatch(args)
    except RunFailed as e:
        # One line: the cause, the full log, and how to continue. The traceback is in the log.
        print(f"ray-fedit: {e}; full log: {e.log}; continue with: ray-fedit run --resume "
              f"{e.run_dir}", file=sys.stderr)
        cause = root_cause(e.cause)
        if isinstance(cause, KeyboardInterrupt):
            return 130
        return EXIT_CONFIG if isinstance(cause, (ConfigError, DataError)) else 1
    except ConfigError as e:
        print(f"ray-fedit: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except DataError as e:  # a bad data file is bad input too
        print(f"ray-fedit: data error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except RayFeditError as e:
        print(f"ray-fedit: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ray-fedit: interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130


def _show_progress_logs() -> None:
    """Show ray_fedit's INFO logs (progress of data generation, cache hits) on stderr."""
    from ray_fedit.console import show_project_logs

    show_project_logs()


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "doctor":
        from ray_fedit.doctor import doctor

        return doctor(address=args.address, start_ray=not args.no_ray)
    if args.command == "run":
        from ray_fedit.pipeline import resume_run, run_pipeline

        stages = args.stages.split(",") if args.stages else None
        if args.resume:
            if args.config:
                raise ConfigError("--resume takes the run directory alone; its "
                                  "resolved_config.yaml is the config")
            resume_run(Path(args.resume), stages=stages)
        else:
            if not args.config:
                raise ConfigError("run needs a CONFIG (e.g. configs/quickstart.yaml) or --resume")
            run_pipeline(_load(args.config, args.overrides), stages=stages)
        return 0
    if args.command == "sweep":
        from ray_fedit.sweeps import run_sweep

        run_sweep(Path(args.sweep), args.overrides, resume=args.resume)
        return 0
    if args.command == "generate":
        from ray_fedit.pipeline import generate_command

        cfg = _load(args.config, args.overrides)
        generate_command(cfg, args.kind, out=args.out, adapter=args.adapter)
        return 0
    if args.command == "evaluate":
        from ray_fedit.pipeline import evaluate_command

        cfg = _load(args.config, args.overrides)
        evaluate_command(cfg, adapter=args.adapter, out=args.out, overwrite=args.overwrite,
                         resume=args.resume)
        return 0
    if args.command == "export":
        from ray_fedit.export import export_adapter

        dest = export_adapter(Path(args.run_dir), Path(args.dest), stage=args.stage,
                              merge=args.merge)
        print(f"{'merged model' if args.merge else 'adapter'} ({args.stage}) written to {dest}")
        return 0
    if args.command == "ls":
        from ray_fedit.discovery import COMPONENT_KINDS, format_listing

        print(format_listing([args.kind] if args.kind else ["configs", *COMPONENT_KINDS]))
        return 0
    if args.command == "cp":
        from ray_fedit.discovery import copy_config

        print(f"copied to {copy_config(args.name, Path(args.dest), force=args.force)}")
        return 0
    if args.command == "validate":
        from ray_fedit.discovery import validate

        stages = args.stages.split(",") if args.stages else None
        print(validate(args.config, args.overrides, stages))
        return 0
    if args.command == "report":
        from ray_fedit.report import write_report

        write_report(Path(args.directory))
        return 0
    raise AssertionError(args.command)  # argparse restricts the choices


if __name__ == "__main__":
    sys.exit(main())

"""Fixed cost of ``ray-fedit run`` on a tiny workload, against an in-process floor doing the same work.

    PYTHONPATH=. .venv/bin/python benchmarks/fixed_cost.py              # 2 repeats of each side
    PYTHONPATH=. .venv/bin/python benchmarks/fixed_cost.py --repeats 3

The workload is the command the run side times::

    python -m ray_fedit run tests/assets/tiny_run.yaml --stages prepare,federate \\
        federation.rounds=1 federation.local_steps=1 attack.compare_no_attack=false

- floor: a fresh Python process (this file with ``--floor``) that loads the same config, does the
  prepare stage's work (``stage_prepare`` on a temporary run directory; the tiny config's data is
  all local files, so no generation), builds the tiny model with LoRA and trains the sampled
  clients' local steps in a sequential loop, then averages the deltas: one process, no Ray.
- run: the ``ray-fedit run`` command above as a subprocess.

Both are timed as whole processes from the outside (interpreter start and imports included on
both sides), alternating ``--repeats`` times; the fastest repeat of each side counts, since other
load only ever slows a side down. It prints both walls, the floor's own phases, and the ratio
run / floor. Both sides must end with the bitwise same global adapter (the same work), which it
checks against the run's ``checkpoints/final``.

``--quickstart-before TREE`` also runs ``configs/quickstart.yaml`` (the whole demo, 6-8 minutes a
run on 2 idle cores with warm caches) from TREE (a checkout of an earlier commit, e.g. ``git worktree add
../before COMMIT``) and then from this tree, with the same caches (the first run fills them, so
run it once beforehand for a fair ``prepare``), and prints each stage's seconds before and after,
their ratio, and whether every adapter (``adapter_model.safetensors``) and every evaluation's
responses are the same bytes and rows::

    PYTHONPATH=. .venv/bin/python benchmarks/fixed_cost.py --repeats 1 --quickstart-before ../before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests/assets/tiny_run.yaml"
OVERRIDES = ["federation.rounds=1", "federation.local_steps=1", "attack.compare_no_attack=false"]
STAGES = "prepare,federate"


def floor(out: Path) -> None:
    """The in-process side (runs in its own process): write phases and the final vector to ``out``."""
    t0 = time.perf_counter()
    import numpy as np
    import torch  # noqa: F401  (imports are part of the floor, as they are of the run)
    from federation_overhead import baseline

    from ray_fedit.config import load_config
    from ray_fedit.federation.sampling import sample_clients
    from ray_fedit.pipeline import _load_clients, stage_prepare
    from ray_fedit.rundir import RunDir

    t_import = time.perf_counter()
    cfg = load_config(CONFIG, [*OVERRIDES, f"output.root={out.parent}"])
    run = RunDir(out.parent / "floor_run")
    run.data.mkdir(parents=True)
    prepared = stage_prepare(cfg, run, {})
    clients = _load_clients(run.data / "clients.parquet", cfg.federation.num_clients)
    t_prepare = time.perf_counter()
    fed = cfg.federation
    mode = "openfedllm" if fed.compat == "openfedllm" else fed.sampling  # driver.sampling_mode

    def sample(rnd: int) -> list[int]:
        return sample_clients(seed=cfg.seed, round_index=rnd, num_clients=fed.num_clients,
                              clients_per_round=fed.clients_per_round, mode=mode,
                              malicious_ids=prepared["malicious_ids"])

    rounds, x = baseline(cfg, clients, sample)
    t_end = time.perf_counter()
    np.save(out.with_suffix(".npy"), x)
    out.write_text(json.dumps({"imports": t_import - t0, "prepare": t_prepare - t_import,
                               "model_and_rounds": t_end - t_prepare, "rounds": sum(rounds)}))


def timed(cmd: list[str], env: dict[str, str],
          cwd: Path = ROOT) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return wall, proc


def run_adapter(output_root: Path) -> Any:
    from ray_fedit.models.codec import AdapterCodec
    from ray_fedit.models.lora import load_adapter

    (final,) = output_root.glob("*/*/checkpoints/final")
    state, _ = load_adapter(final)
    return AdapterCodec.from_state_dict(state).flatten(state)


QUICKSTART = "configs/quickstart.yaml"


def quickstart(tree: Path, output_root: Path, env: dict[str, str]) -> tuple[float, Path]:
    """``ray-fedit run configs/quickstart.yaml`` from ``tree``'s code: (wall, run directory).

    It runs in ``tree``: ``python -m`` puts the working directory first on ``sys.path``, ahead
    of ``PYTHONPATH`` and of the editable install."""
    tree_env = {**env, "PYTHONPATH": str(tree)}
    probe = subprocess.run([sys.executable, "-c", "import ray_fedit; print(ray_fedit.__file__)"],
                           cwd=tree, env=tree_env, capture_output=True, text=True)
    if not Path(probe.stdout.strip() or "/").resolve().is_relative_to(tree.resolve()):
        sys.exit(f"the quickstart of {tree} would import ray_fedit from {probe.stdout.strip()}")
    wall, _ = timed([sys.executable, "-m", "ray_fedit", "run", QUICKSTART,
                     f"output.root={output_root}", "output.name=quickstart"], tree_env, cwd=tree)
    (run,) = output_root.glob("quickstart/*")
    return wall, run


def stage_seconds(run: Path) -> dict[str, float]:
    """Each finished stage's seconds, from ``RUN/stages/<stage>.json``, in pipeline order."""
    from ray_fedit.pipeline import STAGES

    return {stage: float(json.loads(path.read_text())["seconds"]) for stage in STAGES
            if (path := run / "stages" / f"{stage}.json").is_file()}


def same_outputs(a: Path, b: Path) -> list[str]:
    """What differs between two runs' adapters (bytes) and evaluation responses (rows)."""
    import pyarrow.parquet as pq

    def adapters(root: Path) -> list[Path]:
        # Ray Train's copies of the defense checkpoints sit under directories named by trial id.
        return sorted(p.relative_to(root) for p in root.rglob("adapter_model.safetensors")
                      if "ray_train" not in p.relative_to(root).parts)

    differ = []
    if adapters(a) != adapters(b):
        differ.append(f"the set of adapters ({len(adapters(a))} vs {len(adapters(b))})")
    for rel in adapters(a):
        if (b / rel).is_file() and (a / rel).read_bytes() != (b / rel).read_bytes():
            differ.append(str(rel))
    tables = sorted({p.relative_to(root) for root in (a, b) for p in root.glob("eval/*/*.parquet")})
    for rel in tables:
        if not ((a / rel).is_file() and (b / rel).is_file()) \
                or pq.read_table(a / rel) != pq.read_table(b / rel):
            differ.append(str(rel))
    return differ


def compare_quickstart(before_tree: Path, env: dict[str, str], keep: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if keep is None else keep
        runs = {}
        for side, tree in (("before", before_tree.resolve()), ("after", ROOT)):
            print(f"quickstart {side} ({tree}) ...", flush=True)
            runs[side] = quickstart(tree, root / side, env)
        times = {side: stage_seconds(run) for side, (_, run) in runs.items()}
        print(f"{'stage':20} {'before s':>9} {'after s':>9} {'after/before':>13}")
        for stage in times["before"]:
            b, a = times["before"][stage], times["after"].get(stage, float("nan"))
            print(f"{stage:20} {b:9.1f} {a:9.1f} {a / b:13.2f}")
        (wb, _), (wa, _) = runs["before"], runs["after"]
        print(f"{'process wall':20} {wb:9.1f} {wa:9.1f} {wa / wb:13.2f}")
        differ = same_outputs(runs["before"][1], runs["after"][1])
        print("adapters and evaluation responses bitwise the same: "
              + ("yes" if not differ else f"NO ({', '.join(differ)})"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quickstart-before", type=Path, metavar="TREE",
                        help="also compare the quickstart's stage times with this earlier tree")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep the quickstart runs under DIR (default: a temporary directory)")
    parser.add_argument("--floor", type=Path, help=argparse.SUPPRESS)  # the floor's own process
    args = parser.parse_args()
    if args.floor is not None:
        floor(args.floor)
        return
    import numpy as np

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.quickstart_before is not None and not (args.quickstart_before / QUICKSTART).is_file():
        parser.error(f"--quickstart-before {args.quickstart_before}: no {QUICKSTART} there")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: not empty; name a new or empty directory")
    walls: dict[str, list[float]] = {"floor": [], "run": []}
    same = True
    print(f"{'side':6} {'wall s':>7}  detail", flush=True)
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "floor.json"
            wall, _ = timed([sys.executable, __file__, "--floor", str(out)], env)
            walls["floor"].append(wall)
            phases = json.loads(out.read_text())
            x_floor = np.load(out.with_suffix(".npy"))
            print(f"{'floor':6} {wall:7.2f}  " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                                          phases.items()), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "ray_fedit", "run", str(CONFIG), "--stages", STAGES,
                   *OVERRIDES, f"output.root={tmp}"]
            wall, proc = timed(cmd, env)
            walls["run"].append(wall)
            same = same and bool(np.array_equal(run_adapter(Path(tmp)), x_floor))
            stages = [line.strip() for line in proc.stdout.splitlines() if "] done in" in line]
            print(f"{'run':6} {wall:7.2f}  {'; '.join(stages)}", flush=True)
    ratio = min(walls["run"]) / min(walls["floor"])
    print(f"ray-fedit run / in-process floor (fastest repeats): {min(walls['run']):.2f} s / "
          f"{min(walls['floor']):.2f} s = {ratio:.2f}x; same final adapter (bitwise): {same}")
    if args.quickstart_before is not None:
        compare_quickstart(args.quickstart_before, env, args.keep)


if __name__ == "__main__":
    main()

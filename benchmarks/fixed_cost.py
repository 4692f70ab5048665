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


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--floor", type=Path, help=argparse.SUPPRESS)  # the floor's own process
    args = parser.parse_args()
    if args.floor is not None:
        floor(args.floor)
        return
    import numpy as np

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
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


if __name__ == "__main__":
    main()

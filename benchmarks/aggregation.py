"""Seconds per aggregation rule at LoRA scale, next to the plain mean measured in the same run.

    python benchmarks/aggregation.py            # d = 16.8M (7B LoRA r=32 q/v), n = 10 50 200
    python benchmarks/aggregation.py --quick    # d = 1M, n = 10 50: a short smoke run
    python benchmarks/aggregation.py --n 50 --rules median krum --d 4000000
    python benchmarks/aggregation.py --n 50 --rules median residual --shards 2   # + Ray shards

For every ``n`` the script builds one ``(n, d)`` float32 matrix, times ``mean`` and then every rule
once. A rule whose time, predicted from a run on ``d / 64`` columns, exceeds ``--budget`` seconds is
not run in full: the table shows the prediction (marked ``~``). The Markdown table at the end goes
into docs/aggregators.md.

Parameters: ``f = max(1, n // 5)`` assumed attackers (20%, and 20% of the rows are scaled up 5x);
trimmed mean with the paper's ``trim = 1`` and with ``trim = f``; Krum plain and with the paper's
neighbourhood average; Bulyan ``f = min(n // 5, (n - 3) // 4)``; DnC's defaults (``b = 10000``);
clipping radii from the rows' norms so that clipping is active. When the ``(n, d)`` matrix does not
fit in memory, fewer columns are timed and the times scaled up linearly (marked ``~``).

With ``--shards K`` the script starts a local Ray instance (``--ray-cpus``, default all CPUs) and
also times every rule that splits by coordinates (a ``column_plan``) through
``ray_fedit.federation.sharded.run_sharded``: as one Ray task and as ``K`` tasks of one CPU each
(workers started and the object store's memory written once before timing; putting the
matrix into the store is inside the timing). The table then
gains the ``K``-shard seconds, ``in process / K shards`` and ``1 shard / K shards``; every sharded
result is checked to equal the in-process one bitwise. A sharded run whose time, predicted from the
in-process one, exceeds ``--budget`` is not run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

# On a shared or oversubscribed CPU, OpenMP's default spin-waiting made the chunked rules 5-40x
# slower (median, n=50, d=1M, load 7 on 2 cores: 12 s instead of 1.5 s); it must be set before
# torch loads. Keep an explicit setting if the caller made one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_fedit.aggregators import AGGREGATORS, aggregate, state_params  # noqa: E402
from ray_fedit.aggregators.base import column_plan  # noqa: E402

LORA_7B_D = 16_777_216  # Llama-2-7B, r=32 on q_proj and v_proj: 32 layers * 2 * 2 * 4096 * 32
PROBE_FRACTION = 64


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a conservative 8 GiB."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def make_updates(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n distinct pseudo-random rows: shifted copies of one Gaussian vector, ~20% scaled up.

    Shifting one vector instead of drawing n*d samples builds 13 GB in seconds, and every column
    still holds n different values, so sorts and selections do real work.
    """
    base = torch.randn(d + 1, generator=torch.Generator().manual_seed(seed))[:d]
    updates = torch.empty(n, d, dtype=torch.float32)
    for i in range(n):
        updates[i] = torch.roll(base, shifts=i * 7919 + 1)
    f = max(1, n // 5)
    updates[-f:] *= 5.0  # a far minority, as under a scaling attack
    return updates


def rule_variants(name: str, n: int, updates: torch.Tensor) -> list[dict]:
    """The parameter sets timed for a rule at ``n`` clients."""
    f = max(1, n // 5)
    radius = float(torch.linalg.vector_norm(updates[: min(n, 8)], dim=1).median())
    table: dict[str, list[dict]] = {
        "median": [{}],
        "trimmed_mean": [{"trim": 1}, {"trim": f}],  # the paper's trimmed_num = 1, and trim = f
        "krum": [{"f": f}, {"f": f, "average_neighbourhood": True}],
        "multi_krum": [{"f": f}],
        "bulyan": [{"f": max(0, min(n // 5, (n - 3) // 4))}],
        "dnc": [{"f": f}],
        "foolsgold": [{}],
        "foolsgold_stateless": [{}],
        "residual": [{}],
        "norm_clip": [{"max_norm": radius}],
        "geometric_median": [{}],
        "centered_clipping": [{"tau": radius / 2, "iters": 3}],
    }
    if name not in table:
        raise SystemExit(f"no benchmark parameters for rule {name!r}; add it to rule_variants")
    return table[name]


def rule_state(name: str) -> dict:
    """The federation state a rule needs in a single round: DnC's generator (seed 0). Centered
    clipping starts from zero and FoolsGold from no history, as in a first round."""
    return {"generator": torch.Generator().manual_seed(0)} if "generator" in state_params(name) else {}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_result(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def same_result(a: object, b: object) -> bool:
    return torch.equal(a.aggregate, b.aggregate) and torch.equal(a.client_weights, b.client_weights)


def columns_that_fit(n: int, d: int, copies: int = 1) -> int:
    """The largest ``d / 2**k`` (k <= 6) whose ``(n, d)`` matrix fits ``copies`` times in memory.

    Leaves max(2 GiB, a quarter of the matrix) for the rules' buffers and the other processes on
    the machine; sharded runs need a second copy in the object store. Returns 0 if not even
    ``d / 64`` columns fit.
    """
    have = available_bytes()
    cols = d
    while cols >= d // 64:
        need = n * cols * 4
        if copies * need + max(2 << 30, need // 4) <= have:
            return cols
        cols //= 2
    return 0


def format_params(params: dict) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def bench_n(
    n: int, d: int, rules: list[str], budget: float, shards: int | None
) -> list[tuple[str, ...]]:
    """Time ``mean`` and every rule at ``n`` clients; rows of the final table."""
    d_run = columns_that_fit(n, d, copies=2 if shards else 1)
    gib = n * d * 4 / 2**30
    blank = ("-", "-", "-") if shards else ()
    if d_run == 0:
        reason = f"{gib:.1f} GiB of updates do not fit ({available_bytes() / 2**30:.1f} GiB free)"
        print(f"skip n={n}: {reason}", flush=True)
        return [(str(n), "(all)", "-", "-", *blank, f"skipped: {reason}")]
    scale = d / d_run  # > 1 when the full matrix does not fit: time fewer columns, scale up
    mark = "~" if scale > 1 else ""
    scaled = f"timed at d={d_run:,} x{scale:.0f} ({gib:.1f} GiB does not fit)" if scale > 1 else ""
    updates = make_updates(n, d_run)
    weights = torch.ones(n)
    if shards:
        warm_object_store(updates)
    t_mean = timed(lambda: aggregate("mean", updates, weights)) * scale
    print(f"n={n:4d} {'mean':17s} {mark}{t_mean:8.2f} s", flush=True)
    rows = [(str(n), "mean", f"{mark}{t_mean:.2f}", "1.0", *blank, scaled)]
    probe = updates[:, : max(1, d_run // PROBE_FRACTION)]
    for name in rules:
        for params in rule_variants(name, n, updates):
            predicted = timed(
                lambda nm=name, p=params: aggregate(nm, probe, weights, state=rule_state(nm), **p)
            )
            predicted *= PROBE_FRACTION * scale
            result = None
            if predicted > budget:
                seconds = predicted
                shown = f"~{seconds:.0f}"
                note = f"extrapolated from d={probe.shape[1]:,} (over the {budget:.0f} s budget)"
            else:
                seconds, result = timed_result(
                    lambda nm=name, p=params: aggregate(
                        nm, updates, weights, state=rule_state(nm), **p
                    )
                )
                seconds *= scale
                shown, note = f"{mark}{seconds:.2f}", scaled
            label = format_params(params)
            sharded = blank
            if shards:
                sharded, extra = bench_sharded(name, params, updates, weights, result, seconds,
                                               scale, mark, shards, budget)
                note = "; ".join(x for x in (note, extra) if x)
            print(
                f"n={n:4d} {name:17s} {shown:>9s} s  x{seconds / t_mean:7.1f}  "
                f"{'  '.join(sharded)}  {label} {note}",
                flush=True,
            )
            notes = "; ".join(x for x in (label, note) if x)
            rows.append((str(n), name, shown, f"{seconds / t_mean:.1f}", *sharded, notes))
    return rows


def bench_sharded(
    name: str,
    params: dict,
    updates: torch.Tensor,
    weights: torch.Tensor,
    reference: object,
    seconds: float,
    scale: float,
    mark: str,
    shards: int,
    budget: float,
) -> tuple[tuple[str, str, str], str]:
    """``(K-shard seconds, in process / K shards, 1 shard / K shards)`` cells and a note."""
    from ray_fedit.federation.sharded import run_sharded

    if column_plan(name) is None:
        return ("-", "-", "-"), ""
    if reference is None or seconds * (1 + 1 / shards) * 2 > budget:
        return ("-", "-", "-"), "sharded runs skipped (over the budget)"
    t_one, one = timed_result(lambda: run_sharded(name, updates, weights, 1, 1.0, **params))
    t_k, many = timed_result(lambda: run_sharded(name, updates, weights, shards, 1.0, **params))
    t_one, t_k = t_one * scale, t_k * scale
    if not (same_result(one, reference) and same_result(many, reference)):
        raise SystemExit(f"{name} {params}: a sharded result differs from the in-process one")
    print(f"n={updates.shape[0]:4d} {name:17s} 1 shard {mark}{t_one:.2f} s, {shards} shards "
          f"{mark}{t_k:.2f} s (bitwise equal)", flush=True)
    cells = (f"{mark}{t_k:.2f}", f"{seconds / t_k:.2f}", f"{t_one / t_k:.2f}")
    return cells, f"1 shard {mark}{t_one:.2f} s"


def warm_object_store(updates: torch.Tensor) -> None:
    """Write twice the matrix's size into the object store once, untimed.

    The store's shared memory is faulted in on first write: a 3.4 GB put took 3-4.4 s into fresh
    pages and 0.5 s into pages written before. A federation pays that in its first rounds only.
    """
    import ray

    capacity = int(ray.cluster_resources().get("object_store_memory", 0))
    size = min(updates.numel() * 4, int(0.45 * capacity)) // 4  # two of them fit, no spilling
    filler = np.zeros(size, dtype=np.float32)
    refs = [ray.put(filler), ray.put(filler)]
    del refs


def start_ray(cpus: int, shards: int) -> None:
    """A local Ray instance whose ``shards`` workers have imported the rules already."""
    import ray

    from ray_fedit.federation.sharded import run_sharded

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    small = make_updates(11, 200_000)
    for k in sorted({1, shards}):
        run_sharded("median", small, torch.ones(11), k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--d", type=int, default=None, help=f"coordinates (default {LORA_7B_D})")
    parser.add_argument(
        "--n", type=int, nargs="+", default=None, help="clients (default 10 50 200)"
    )
    parser.add_argument("--rules", nargs="+", default=None, help="rules to time (default: all)")
    parser.add_argument("--quick", action="store_true", help="d = 1M, n = 10 50")
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help="also time the coordinate-wise rules as 1 and K Ray shard tasks of 1 CPU each",
    )
    parser.add_argument(
        "--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds; a rule predicted to take longer is extrapolated, not run (default 300)",
    )
    args = parser.parse_args(argv)
    d = args.d or (1_000_000 if args.quick else LORA_7B_D)
    ns = args.n or ([10, 50] if args.quick else [10, 50, 200])
    rules = [r for r in (args.rules or AGGREGATORS.names()) if r != "mean"]
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"{platform.machine()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"load average {os.getloadavg()[0]:.1f} at start, d={d:,}",
        flush=True,
    )
    if args.shards:
        start_ray(args.ray_cpus or os.cpu_count() or 1, args.shards)
    rows = [row for n in ns for row in bench_n(n, d, rules, args.budget, args.shards)]
    print(f"# load average {os.getloadavg()[0]:.1f} at end")
    if args.shards:
        k = args.shards
        print(f"\n| n | rule | seconds | rule / mean | {k} shards s | in process / {k} shards "
              f"| 1 shard / {k} shards | parameters, notes |\n|---|---|---|---|---|---|---|---|")
    else:
        print("\n| n | rule | seconds | rule / mean | parameters, notes |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Seconds per aggregation rule at LoRA scale, next to the plain mean measured in the same run.

    python benchmarks/aggregation.py            # d = 16.8M (7B LoRA r=32 q/v), n = 10 50 200
    python benchmarks/aggregation.py --quick    # d = 1M, n = 10 50: a short smoke run
    python benchmarks/aggregation.py --n 50 --rules median krum --d 4000000

For every ``n`` the script builds one ``(n, d)`` float32 matrix, times ``mean`` and then every rule
once. A rule whose time, predicted from a run on ``d / 64`` columns, exceeds ``--budget`` seconds is
not run in full: the table shows the prediction (marked ``~``). The Markdown table at the end goes
into docs/aggregators.md.

Parameters: ``f = max(1, n // 5)`` assumed attackers (20%, and 20% of the rows are scaled up 5x);
trimmed mean with the paper's ``trim = 1`` and with ``trim = f``; Krum plain and with the paper's
neighbourhood average; Bulyan ``f = min(n // 5, (n - 3) // 4)``; DnC's defaults (``b = 10000``);
clipping radii from the rows' norms so that clipping is active. When the ``(n, d)`` matrix does not
fit in memory, fewer columns are timed and the times scaled up linearly (marked ``~``).
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

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_fedit.aggregators import AGGREGATORS, aggregate  # noqa: E402

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
        "residual": [{}],
        "norm_clip": [{"max_norm": radius}],
        "geometric_median": [{}],
        "centered_clipping": [{"tau": radius / 2, "iters": 3}],
    }
    if name not in table:
        raise SystemExit(f"no benchmark parameters for rule {name!r}; add it to rule_variants")
    return table[name]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def columns_that_fit(n: int, d: int) -> int:
    """The largest ``d / 2**k`` (k <= 6) whose ``(n, d)`` matrix fits in the available memory.

    Leaves max(2 GiB, a quarter of the matrix) for the rules' buffers and the other processes on
    the machine. Returns 0 if not even ``d / 64`` columns fit.
    """
    have = available_bytes()
    cols = d
    while cols >= d // 64:
        need = n * cols * 4
        if need + max(2 << 30, need // 4) <= have:
            return cols
        cols //= 2
    return 0


def format_params(params: dict) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def bench_n(n: int, d: int, rules: list[str], budget: float) -> list[tuple[str, ...]]:
    """Time ``mean`` and every rule at ``n`` clients; rows of the final table."""
    d_run = columns_that_fit(n, d)
    gib = n * d * 4 / 2**30
    if d_run == 0:
        reason = f"{gib:.1f} GiB of updates do not fit ({available_bytes() / 2**30:.1f} GiB free)"
        print(f"skip n={n}: {reason}", flush=True)
        return [(str(n), "(all)", "-", "-", f"skipped: {reason}")]
    scale = d / d_run  # > 1 when the full matrix does not fit: time fewer columns, scale up
    mark = "~" if scale > 1 else ""
    scaled = f"timed at d={d_run:,} x{scale:.0f} ({gib:.1f} GiB does not fit)" if scale > 1 else ""
    updates = make_updates(n, d_run)
    weights = torch.ones(n)
    t_mean = timed(lambda: aggregate("mean", updates, weights)) * scale
    print(f"n={n:4d} {'mean':17s} {mark}{t_mean:8.2f} s", flush=True)
    rows = [(str(n), "mean", f"{mark}{t_mean:.2f}", "1.0", scaled)]
    probe = updates[:, : max(1, d_run // PROBE_FRACTION)]
    for name in rules:
        for params in rule_variants(name, n, updates):
            predicted = timed(lambda nm=name, p=params: aggregate(nm, probe, weights, **p))
            predicted *= PROBE_FRACTION * scale
            if predicted > budget:
                seconds = predicted
                shown = f"~{seconds:.0f}"
                note = f"extrapolated from d={probe.shape[1]:,} (over the {budget:.0f} s budget)"
            else:
                seconds = timed(lambda nm=name, p=params: aggregate(nm, updates, weights, **p))
                seconds *= scale
                shown, note = f"{mark}{seconds:.2f}", scaled
            label = format_params(params)
            print(
                f"n={n:4d} {name:17s} {shown:>9s} s  x{seconds / t_mean:7.1f}  {label} {note}",
                flush=True,
            )
            notes = "; ".join(x for x in (label, note) if x)
            rows.append((str(n), name, shown, f"{seconds / t_mean:.1f}", notes))
    return rows


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
    rows = [row for n in ns for row in bench_n(n, d, rules, args.budget)]
    print(f"# load average {os.getloadavg()[0]:.1f} at end")
    print("\n| n | rule | seconds | rule / mean | parameters, notes |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

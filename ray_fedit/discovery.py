"""Discovery: the shipped configs and registered components (``ray-fedit ls``), copying a config
to edit (``ray-fedit cp``) and checking one without running it (``ray-fedit validate``).

Shipped configs live in the repository's top-level ``configs/`` (run, sweep and DeepSpeed files).
They are found next to the installed package (the editable install the README sets up), or in the
directory ``RAY_FEDIT_CONFIGS`` names. A config's name is its path under that directory without
the suffix: ``quickstart``, ``sweeps/aggregators``, ``deepspeed/zero3``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_fedit.errors import ConfigError

CONFIG_SUFFIXES = (".yaml", ".json")
#: registry attribute names of :mod:`ray_fedit.registry`, in the order ``ls`` prints them.
COMPONENT_KINDS = {"aggregators": "AGGREGATORS", "attacks": "ATTACKS", "defenses": "DEFENSES",
                   "judges": "JUDGES", "datasets": "DATASETS"}


@dataclass(frozen=True)
class Entry:
    name: str
    description: str


def configs_dir() -> Path:
    """The directory of the shipped configs.

    Raises:
        ConfigError: when ``RAY_FEDIT_CONFIGS`` names no directory, or no ``configs/`` sits next
            to the package (a wheel install without the repository).
    """
    env = os.environ.get("RAY_FEDIT_CONFIGS")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise ConfigError(f"RAY_FEDIT_CONFIGS={env!r} is not a directory")
        return path
    path = Path(__file__).resolve().parents[1] / "configs"
    if not path.is_dir():
        raise ConfigError(f"no shipped configs at {path}: install from the repository "
                          "(`pip install -e .`) or set RAY_FEDIT_CONFIGS to its configs/ directory")
    return path


# A full stop and a space, except after the abbreviations docstrings use.
_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\bFig)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)\.\s")


def _first_sentence(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    m = _SENTENCE_END.search(text)
    sentence = text[:m.start()] if m else text.rstrip(".")
    return sentence if len(sentence) <= limit else sentence[:limit - 3].rstrip() + "..."


def _config_description(path: Path) -> str:
    """The first sentence of a YAML file's leading comment, or what a DeepSpeed JSON sets."""
    if path.suffix == ".json":
        try:
            zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {})
        except json.JSONDecodeError as e:
            return f"(unreadable JSON: line {e.lineno}: {e.msg})"
        offload = [k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param")
                   if zero.get(k, {}).get("device") not in (None, "none")]
        return (f"DeepSpeed ZeRO stage {zero.get('stage', 0)}"
                + (f", {' and '.join(offload)} offloaded" if offload else "")
                + " (defense.deepspeed)")
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return _first_sentence(" ".join(lines)) if lines else ""


def list_configs() -> list[Entry]:
    """Every shipped config, by name, with the first sentence of its description."""
    root = configs_dir()
    paths = sorted(p for p in root.rglob("*") if p.suffix in CONFIG_SUFFIXES and p.is_file())
    return [Entry(p.relative_to(root).with_suffix("").as_posix(), _config_description(p))
            for p in paths]


def _doc_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return _first_sentence(doc.replace("``", "").split("\n\n")[0]) if doc else ""


def list_components(kind: str) -> list[Entry]:
    """Registered components of one kind (``aggregators``, ``attacks``, ...) with one line each."""
    from ray_fedit import registry

    if kind not in COMPONENT_KINDS:
        raise ConfigError(f"unknown kind {kind!r}; known: configs, {', '.join(COMPONENT_KINDS)}")
    reg = getattr(registry, COMPONENT_KINDS[kind])
    return [Entry(name, _doc_line(reg.get(name))) for name in reg.names()]


def format_listing(kinds: Sequence[str]) -> str:
    """The text ``ray-fedit ls [KIND]`` prints: one section per kind, one line per entry."""
    blocks = []
    for kind in kinds:
        entries = list_configs() if kind == "configs" else list_components(kind)
        width = max((len(e.name) for e in entries), default=0)
        body = "\n".join(f"  {e.name:<{width}}  {e.description}".rstrip() for e in entries)
        blocks.append(f"{kind}:\n{body or '  (none)'}")
    return "\n\n".join(blocks)


def resolve_config(name: str) -> Path:
    """The shipped config called ``name`` (with or without its suffix).

    Raises:
        ConfigError: for an unknown name; the message lists the shipped ones.
    """
    root = configs_dir()
    stem = name.removesuffix(".yaml").removesuffix(".json")
    for suffix in CONFIG_SUFFIXES:
        path = root / f"{stem}{suffix}"
        if path.is_file() and path.resolve().is_relative_to(root.resolve()):
            return path
    known = ", ".join(e.name for e in list_configs())
    raise ConfigError(f"no shipped config named {name!r}; shipped: {known} (ray-fedit ls configs)")


def copy_config(name: str, dest: Path, *, force: bool = False) -> Path:
    """Copy the shipped config ``name`` to ``dest`` (a file, or an existing directory).

    Raises:
        ConfigError: for an unknown name, or a destination that exists (without ``force``).
    """
    src = resolve_config(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        raise ConfigError(f"{target.parent} is not a directory")
    shutil.copyfile(src, target)
    return target


def _config_path(config: str) -> Path:
    """``config`` as a path, or the shipped config of that name when no such file exists."""
    path = Path(config)
    return path if path.exists() or path.suffix in CONFIG_SUFFIXES else resolve_config(config)


def validate(config: str, overrides: Sequence[str], stages: Sequence[str] | None = None) -> str:
    """Every check ``ray-fedit run`` (or ``sweep``) makes before Ray starts; a short summary.

    A run config is parsed and validated (types, ranges, cross-field rules, registered names),
    its stages are resolved, and every local data file those stages read is read as they read
    it. A sweep file (one with a ``grid``) gets the same checks for every trial. ``config`` is a
    path or a shipped config's name.

    Raises:
        ConfigError: for a bad config, override or stage list, or a tracker not installed.
        DataError: for a bad local data file (the file and line are named).
    """
    import yaml

    from ray_fedit.config import load_config
    from ray_fedit.pipeline import preflight, selected_stages

    path = _config_path(config)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except yaml.YAMLError:
        raw = None  # load_config reports the syntax error with its line
    if isinstance(raw, dict) and "grid" in raw:
        from ray_fedit.sweeps import load_sweep

        sweep = load_sweep(path, overrides)
        for trial in sweep.trials:
            preflight(trial.config, selected_stages(trial.config, stages))
        points = len({t.key for t in sweep.trials})
        return (f"{path}: valid sweep {sweep.spec.name!r}: {len(sweep.trials)} trials "
                f"({points} grid points x {len(sweep.spec.seeds)} seeds) on {sweep.base.name}")
    cfg = load_config(path, overrides)
    chosen = selected_stages(cfg, stages)
    preflight(cfg, chosen)
    fed = cfg.federation
    return (f"{path}: valid. model {cfg.model.name}; {fed.num_clients} clients "
            f"({cfg.num_malicious} malicious), {fed.clients_per_round} per round, {fed.rounds} "
            f"rounds x {fed.local_steps} local steps; aggregator {cfg.aggregator.name}; defense "
            f"{cfg.defense.name}; judges {', '.join(cfg.evaluation.judges)}; stages "
            f"{', '.join(chosen)}")

"""Export a run's adapter so that other tools serve it: ``ray-fedit export RUN_DIR DEST``.

- Without ``--merge``: the stage's PEFT adapter directory (``adapter_config.json`` +
  ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained`` or vLLM's LoRA
  support on the run's base model.
- With ``--merge``: a standalone transformers model directory, the base model with the LoRA delta
  merged into its weights (``merge_and_unload``), in safetensors, with the tokenizer and its chat
  template: ``AutoModelForCausalLM.from_pretrained(DEST)`` and ``vllm serve DEST`` load it as it is.

Stages: ``attacked`` (the federation's final adapter), ``no_attack`` (the paired reference
federation's) and ``defended`` (the post-hoc defense's), as the run's stage records name them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ray_fedit.errors import ConfigError

EXPORT_STAGES = ("attacked", "no_attack", "defended")


def stage_adapter(run_dir: Path, stage: str) -> Path:
    """The PEFT adapter directory the run wrote for ``stage``.

    Raises:
        ConfigError: unknown stage, or the run has not produced that adapter (yet).
    """
    if stage not in EXPORT_STAGES:
        raise ConfigError(f"--stage {stage!r} must be one of {list(EXPORT_STAGES)}")
    record = "defend" if stage == "defended" else "federate"
    path = run_dir / "stages" / f"{record}.json"
    try:
        outputs = json.loads(path.read_text())["outputs"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{run_dir} has no finished '{record}' stage ({path}: {e}); run it, or "
                          "export another --stage") from None
    adapter = outputs.get("adapter") if stage == "defended" else outputs["adapters"].get(stage)
    if not adapter:
        raise ConfigError(f"{run_dir} has no {stage} adapter (set attack.compare_no_attack=true "
                          "for the no_attack federation)")
    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"the {stage} adapter {adapter_dir} is missing (moved run directory?)")
    return adapter_dir


def export_adapter(run_dir: Path, dest: Path, *, stage: str = "defended",
                   merge: bool = False) -> Path:
    """Write the stage's adapter, or the merged model, to ``dest`` (which must not exist or be empty).

    Returns:
        ``dest``.

    Raises:
        ConfigError: a bad stage or run directory, or a non-empty ``dest``.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    adapter_dir = stage_adapter(run_dir, stage)
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest} is not empty; export into a new directory")
    if not merge:
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter_dir / name, dest / name)
        return dest
    from ray_fedit.config import load_config
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import load_peft

    cfg = load_config(run_dir / "resolved_config.yaml")
    base, tok = load_model_and_tokenizer(cfg.model)
    merged = load_peft(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(str(dest), safe_serialization=True)
    tok.save_pretrained(str(dest))
    return dest

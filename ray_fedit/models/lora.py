"""LoRA wrapping and adapter I/O in PEFT's own format.

Adapters are saved as ``adapter_config.json`` + ``adapter_model.safetensors``, exactly what
``PeftModel.from_pretrained`` loads, and are read back with safetensors only (never unpickled).
A state dict here is PEFT's: the keys of ``get_peft_model_state_dict`` (no adapter name inside).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ray_fedit.config import LoraConfig
from ray_fedit.errors import CheckpointError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_config(cfg: LoraConfig, base_model: str | None = None) -> Any:
    """The ``peft.LoraConfig`` for a LoRA section (causal LM, no bias)."""
    import peft

    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def wrap_lora(model: Any, cfg: LoraConfig, base_model: str | None = None) -> Any:
    """Wrap a causal LM in a trainable LoRA adapter (base weights frozen)."""
    import peft

    return peft.get_peft_model(model, peft_config(cfg, base_model))


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors (detached CPU copies), keyed as in PEFT checkpoints."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a PEFT model in place.

    Raises:
        CheckpointError: if a key of the model's adapter is missing from ``state``.
    """
    from peft import set_peft_model_state_dict

    expected = set(adapter_state_keys(model))
    if expected != set(state):
        missing = sorted(expected - set(state))[:3]
        raise CheckpointError(f"adapter state does not match the model: missing {missing}, "
                              f"unexpected {sorted(set(state) - expected)[:3]}")
    set_peft_model_state_dict(model, state)


def adapter_state_keys(model: Any) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model))


def save_adapter(state: dict[str, torch.Tensor], cfg: LoraConfig, directory: str | Path,
                 base_model: str | None = None) -> Path:
    """Write an adapter in PEFT format; ``PeftModel.from_pretrained(base, directory)`` loads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config(cfg, base_model).save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    return directory


def load_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a PEFT-format adapter: ``(state dict, adapter_config as a dict)``.

    Raises:
        CheckpointError: if the directory lacks the two PEFT files.
    """
    directory = Path(directory)
    weights, config = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    for f in (weights, config):
        if not f.is_file():
            raise CheckpointError(f"{f} does not exist: not a PEFT adapter directory "
                                  f"(expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    return load_file(str(weights)), json.loads(config.read_text())


def lora_config_from_peft(adapter_config: dict[str, Any]) -> LoraConfig:
    """The LoRA section that produced a saved adapter (to rebuild the model that loads it)."""
    return LoraConfig(r=adapter_config["r"], alpha=adapter_config["lora_alpha"],
                      dropout=adapter_config.get("lora_dropout", 0.0),
                      target_modules=sorted(adapter_config["target_modules"]))

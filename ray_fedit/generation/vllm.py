"""The ``vllm`` engine: ``ray.data.llm`` with vLLM on GPU clusters (optional extra ``[vllm]``).

Built with Ray 2.60's public API: ``ray.data.llm.vLLMEngineProcessorConfig`` and
``ray.data.llm.build_processor`` (the older ``build_llm_processor`` name is gone from 2.60). A LoRA
adapter is applied per row: each request row names the adapter directory in its ``model`` column,
and the vLLM stage loads it as a ``LoRARequest`` (a local path is used as is), so round checkpoints
are evaluated without merging them into the base model.

Everything but :func:`check_available` and :func:`run` is a pure function of the config, the
adapter's rank and the rows, unit-tested on CPU without vLLM (``tests/unit/test_generation_vllm.py``)
against the field names Ray 2.60's processor stages read and write:

- :func:`processor_config_kwargs` (with :func:`engine_kwargs`, :func:`max_lora_rank`,
  :func:`model_source`): the ``vLLMEngineProcessorConfig`` keyword arguments. The chat-template
  stage is on for the ``chat`` template (it renders ``messages`` into ``prompt``); the tokenize stage
  reads ``prompt``, the detokenize stage writes ``generated_text`` without special tokens.
- :func:`preprocess` (``rows.vllm_request``): ``messages`` (chat) or ``prompt`` (Alpaca),
  ``sampling_params`` (vLLM ``SamplingParams`` fields), and ``model`` (the adapter path) per row.
- :func:`postprocess`: ``_idx``, ``generated_text``, ``num_generated_tokens``, and a
  ``finish_reason`` derived from the token count, since vLLM's output row carries none.

The processor itself (Ray Data, the vLLM engine on a GPU) has not run in this project yet: no GPU
was available where it was written (see docs/generation.md).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from ray_fedit.config import TINY_MODEL, GenerationConfig, ModelConfig
from ray_fedit.data.templates import Template
from ray_fedit.generation.errors import GenerationError
from ray_fedit.generation.rows import SamplingParams, vllm_output, vllm_request

# vLLM's ``LoRAConfig.max_lora_rank`` is ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320,
# 512]`` (vllm/config/lora.py; the same in the API docs of 0.14, 0.22, 0.26 and the stable docs).
# The pinned 0.33 is not installed on CPU machines, so this list is checked against docs only.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def model_source(model_cfg: ModelConfig) -> str:
    """What vLLM loads: a hub id or a directory (the bundled SmolLM2's HF cache copy).

    Raises:
        GenerationError: for the tiny random model, which exists only in memory.
    """
    from ray_fedit.config import BUNDLED_MODEL

    if model_cfg.name == TINY_MODEL:
        raise GenerationError(f"model.name={TINY_MODEL!r} is built in memory and cannot be served "
                              "by vLLM; use generation.engine=hf")
    if model_cfg.name == BUNDLED_MODEL:
        from ray_fedit.models.loading import bundled_model_dir

        return str(bundled_model_dir())
    return model_cfg.name


def max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``rank``.

    vLLM sizes its LoRA buffers by ``max_lora_rank`` and accepts only :data:`VLLM_LORA_RANKS`; an
    adapter of a smaller rank runs under a larger maximum (``lora.r=4`` -> 8, ``r=32`` -> 32).

    Raises:
        GenerationError: if the rank is above vLLM's largest (512).
    """
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise GenerationError(f"lora.r={rank} is above the largest LoRA rank vLLM serves "
                          f"({VLLM_LORA_RANKS[-1]}); use generation.engine=hf")


def engine_kwargs(model_cfg: ModelConfig, lora_rank: int | None) -> dict[str, Any]:
    """vLLM engine arguments: the dtype and revision of the model, and LoRA when an adapter is used.

    Args:
        model_cfg: the base model.
        lora_rank: the adapter's rank ``r``, or None without an adapter.
    """
    kwargs: dict[str, Any] = {"dtype": model_cfg.dtype}
    if model_cfg.revision is not None:
        kwargs["revision"] = model_cfg.revision
    if lora_rank is not None:
        # One adapter per call of generate(): every row names the same one.
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(lora_rank), max_loras=1)
    return kwargs


def adapter_rank(adapter_dir: str | Path) -> int:
    """The LoRA rank ``r`` of a PEFT adapter directory (from its ``adapter_config.json``)."""
    return int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])


def processor_config_kwargs(model_cfg: ModelConfig, gen: GenerationConfig, template: Template,
                            adapter_dir: str | Path | None) -> dict[str, Any]:
    """Keyword arguments of ``vLLMEngineProcessorConfig`` for this model, engine and adapter."""
    rank = None if adapter_dir is None else adapter_rank(adapter_dir)
    return {
        "model_source": model_source(model_cfg),
        "engine_kwargs": engine_kwargs(model_cfg, rank),
        "batch_size": gen.batch_size,
        "concurrency": gen.num_actors,
        # Alpaca prompts are rendered by vllm_request; the chat template by the processor.
        "chat_template_stage": template == "chat",
    }


def lora_name(adapter_dir: str | Path | None) -> str | None:
    """The ``model`` column of every row: the adapter's absolute path (None without an adapter).

    The vLLM stage treats a ``model`` different from the base model as a LoRA request and, without
    ``dynamic_lora_loading_path``, loads the adapter from that path.
    """
    return None if adapter_dir is None else str(Path(adapter_dir).resolve())


def preprocess(sampling: SamplingParams, template: Template,
               adapter_dir: str | Path | None) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The processor's ``preprocess``: request row -> vLLM row (:func:`rows.vllm_request`)."""
    return partial(vllm_request, sampling=sampling, template=template,
                   lora_name=lora_name(adapter_dir))


def finish_reason(num_generated_tokens: int, max_tokens: int) -> str:
    """``length`` when generation used the whole token budget, else ``stop`` (EOS or a stop string).

    vLLM's output row (``vLLMOutputData``) has no finish reason, so it is derived from the count:
    a row whose EOS is exactly its last allowed token also reads ``length``.
    """
    return "length" if num_generated_tokens >= max_tokens else "stop"


def response_row(row: Mapping[str, Any], *, max_tokens: int) -> dict[str, Any]:
    """The processor's ``postprocess``: a vLLM output row -> the engine columns.

    Returns:
        ``_idx``, ``generated_text`` (the detokenize stage's text, special tokens skipped),
        ``num_generated_tokens`` (including EOS) and ``finish_reason``.
    """
    out = vllm_output(row)
    out["finish_reason"] = finish_reason(out["num_generated_tokens"], max_tokens)
    return out


def postprocess(sampling: SamplingParams) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The processor's ``postprocess`` for these sampling settings (:func:`response_row`)."""
    return partial(response_row, max_tokens=sampling.max_new_tokens)


def check_available() -> None:
    """Raise a clear error unless vLLM is installed and the Ray cluster has a GPU.

    Raises:
        GenerationError: naming what is missing and how to fix it.
    """
    if importlib.util.find_spec("vllm") is None:
        raise GenerationError("generation.engine=vllm needs the vllm package: "
                              "pip install 'ray-fedit[vllm]' on a CUDA machine; on CPU use "
                              "generation.engine=hf")
    import ray

    if not ray.is_initialized():
        ray.init()  # what Ray Data would do next anyway: join the running cluster or start one
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < 1:
        raise GenerationError(f"generation.engine=vllm needs a CUDA GPU in the Ray cluster "
                              f"(found {gpus:g}); on CPU use generation.engine=hf")


def run(requests: list[dict[str, Any]], *, model_cfg: ModelConfig, gen: GenerationConfig,
        template: Template, sampling: SamplingParams,
        adapter_dir: str | Path | None) -> list[dict[str, Any]]:
    """Answer request rows with a ``ray.data.llm`` vLLM processor; returns engine rows."""
    check_available()
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(**processor_config_kwargs(model_cfg, gen, template,
                                                                 adapter_dir))
    processor = build_processor(config, preprocess=preprocess(sampling, template, adapter_dir),
                                postprocess=postprocess(sampling))
    return processor(ray.data.from_items(requests)).take_all()

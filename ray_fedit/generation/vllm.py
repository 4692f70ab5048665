"""The ``vllm`` engine: ``ray.data.llm`` with vLLM on GPU clusters (optional extra ``[vllm]``).

Built with Ray 2.60's public API: ``ray.data.llm.vLLMEngineProcessorConfig`` and
``ray.data.llm.build_processor`` (the older ``build_llm_processor`` name is gone from 2.60). A LoRA
adapter is applied per row: each request row names the adapter directory in its ``model`` column,
and the vLLM stage loads it as a ``LoRARequest`` (a local path is used as is), so round checkpoints
are evaluated without merging them into the base model.
"""

from __future__ import annotations

import importlib.util
import json
from functools import partial
from pathlib import Path
from typing import Any

from ray_fedit.config import TINY_MODEL, GenerationConfig, ModelConfig
from ray_fedit.data.templates import Template
from ray_fedit.generation.errors import GenerationError
from ray_fedit.generation.rows import SamplingParams, vllm_output, vllm_request


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


def processor_config_kwargs(model_cfg: ModelConfig, gen: GenerationConfig, template: Template,
                            adapter_dir: str | Path | None) -> dict[str, Any]:
    """Keyword arguments of ``vLLMEngineProcessorConfig`` for this model, engine and adapter."""
    engine_kwargs: dict[str, Any] = {"dtype": model_cfg.dtype}
    if model_cfg.revision is not None:
        engine_kwargs["revision"] = model_cfg.revision
    if adapter_dir is not None:
        rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"]
        engine_kwargs.update(enable_lora=True, max_lora_rank=int(rank), max_loras=1)
    return {
        "model_source": model_source(model_cfg),
        "engine_kwargs": engine_kwargs,
        "batch_size": gen.batch_size,
        "concurrency": gen.num_actors,
        # Alpaca prompts are rendered by vllm_request; the chat template by the processor.
        "chat_template_stage": template == "chat",
    }


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
    lora_name = str(Path(adapter_dir).resolve()) if adapter_dir is not None else None
    processor = build_processor(
        config,
        preprocess=partial(vllm_request, sampling=sampling, template=template,
                           lora_name=lora_name),
        postprocess=vllm_output,
    )
    return processor(ray.data.from_items(requests)).take_all()

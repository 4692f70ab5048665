"""The ``hf`` engine: batched transformers ``generate`` in a Ray Data actor (CPU or GPU).

:class:`HFGenerator` is the ``map_batches`` callable class: it loads the base model (and a LoRA
adapter, merged once) when the actor starts and then answers batches of request rows.
:func:`generate_batch` is the in-process core, also used by the benchmark.

Sampling is seeded per row, independently of the batch. ``generate`` runs greedy decoding over
logits to which :class:`RowSeededGumbel` adds Gumbel noise drawn from each row's own generator:
``argmax(logits / T + Gumbel)`` is an exact sample from ``softmax(logits / T)`` (the Gumbel-max
trick), and each row's noise depends only on its seed and step. So a row samples the same text
alone or in any batch, up to floating-point differences of padded batched matmuls.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_fedit.config import ModelConfig
from ray_fedit.data.templates import Template, format_prompt
from ray_fedit.generation.rows import SamplingParams

log = logging.getLogger(__name__)


class RowSeededGumbel:
    """A logits processor: temperature, top-p, then Gumbel noise from one generator per row.

    Args:
        seeds: one seed per batch row, in batch order.
        temperature: > 0.
        top_p: nucleus mass; tokens outside the nucleus get -inf before the noise.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            # Drop a token once the mass before it reaches top_p (the top token always stays).
            drop_sorted = (cum - sorted_scores.softmax(dim=-1)) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        vocab = scores.shape[-1]
        # Noise is drawn on the CPU from each row's generator, so it never depends on the device.
        u = torch.stack([torch.rand(vocab, generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
        return scores + gumbel.to(scores.device)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a response: the model's generation EOS ids and the tokenizer's EOS."""
    ids: set[int] = set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


@torch.inference_mode()
def generate_batch(model: Any, tokenizer: Any, prompts: list[str], seeds: list[int],
                   sampling: SamplingParams, template: Template) -> list[dict[str, Any]]:
    """Answer one batch of user turns.

    Args:
        model: a causal LM (optionally with a merged adapter), in eval mode.
        tokenizer: its tokenizer; it is switched to left padding.
        prompts: user turns (before the template).
        seeds: one sampling seed per prompt (unused when greedy).
        sampling: decoding settings.
        template: ``chat`` (the model's chat template) or ``alpaca``.

    Returns:
        Per prompt: ``generated_text`` (up to, not including, EOS; special tokens skipped),
        ``num_generated_tokens`` (including the EOS token) and ``finish_reason`` (``stop`` at EOS,
        ``length`` at the token limit).
    """
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LogitsProcessorList

    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    texts = [format_prompt(tokenizer, p, template) for p in prompts]
    # Chat templates already start with the special tokens they need.
    enc = tokenizer(texts, return_tensors="pt", padding=True,
                    add_special_tokens=template != "chat").to(model.device)
    eos = eos_token_ids(model, tokenizer)
    config = HFGenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    processors = None
    if not sampling.greedy:
        processors = LogitsProcessorList([RowSeededGumbel(seeds, sampling.temperature,
                                                          sampling.top_p)])
    out = model.generate(**enc, generation_config=config, logits_processor=processors)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    results = []
    eos_set = set(eos)
    for tokens in new:
        end = next((i for i, t in enumerate(tokens) if t in eos_set), None)
        kept = tokens if end is None else tokens[:end]
        results.append({
            "generated_text": tokenizer.decode(kept, skip_special_tokens=True),
            "num_generated_tokens": len(tokens) if end is None else end + 1,
            "finish_reason": "length" if end is None else "stop",
        })
    return results


@contextmanager
def adapter_merged(model: Any, adapter_dir: str | Path | None) -> Iterator[Any]:
    """``model`` with a LoRA adapter merged in for the ``with`` block, then the base weights again.

    The merge is the one :func:`load_generator_model` does (PEFT's ``merge_and_unload`` on the
    same base weights), so the merged model computes bitwise what a fresh load with the adapter
    would. The base weights the merge touches are copied first and put back after, never
    un-merged by subtraction (which would leave rounding residue), so the next adapter starts from
    exactly the loaded base. ``None`` yields ``model`` unchanged.
    """
    if adapter_dir is None:
        yield model
        return
    from peft.tuners.lora import LoraLayer

    from ray_fedit.models.lora import load_peft

    wrapped = load_peft(model, adapter_dir)
    layers = [m.get_base_layer() for m in wrapped.modules() if isinstance(m, LoraLayer)]
    saved = [(param, param.data.clone()) for layer in layers
             for param in (layer.weight, getattr(layer, "bias", None)) if param is not None]
    try:
        yield wrapped.merge_and_unload().eval()
    finally:
        for param, data in saved:
            param.data = data


def load_generator_model(model_cfg: ModelConfig, adapter_dir: str | Path | None,
                         device: str) -> tuple[Any, Any]:
    """The base model with the adapter merged in once (no per-token LoRA cost) and its tokenizer."""
    from ray_fedit.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_cfg, device=device)
    if adapter_dir is not None:
        from ray_fedit.models.lora import load_peft

        model = load_peft(model, adapter_dir).merge_and_unload().eval()
    return model, tok


class HFGenerator:
    """``map_batches`` callable class: loads the model once per actor, then answers batches.

    Args:
        model_cfg: ``ModelConfig.model_dump()`` of the model to load.
        template: ``chat`` or ``alpaca``.
        sampling: ``SamplingParams.as_dict()``.
        adapter_dir: a PEFT adapter directory applied to the base model, or None.
        torch_threads: intra-op threads of this actor.
    """

    def __init__(self, model_cfg: dict[str, Any], template: Template, sampling: dict[str, Any],
                 adapter_dir: str | None, torch_threads: int) -> None:
        import ray

        torch.set_num_threads(torch_threads)
        # A GPU only when Ray gave this actor one; the device code never guesses from the host.
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.model, self.tokenizer = load_generator_model(ModelConfig(**model_cfg), adapter_dir,
                                                          device)
        self.template = template
        self.sampling = SamplingParams(**sampling)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = generate_batch(self.model, self.tokenizer, [str(p) for p in batch["prompt"]],
                             [int(s) for s in batch["seed"]], self.sampling, self.template)
        return {
            "_idx": batch["_idx"],
            "generated_text": [o["generated_text"] for o in out],
            "num_generated_tokens": [o["num_generated_tokens"] for o in out],
            "finish_reason": [o["finish_reason"] for o in out],
        }

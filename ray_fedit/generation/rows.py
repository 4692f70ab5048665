"""Pure row functions of the generation pipelines: requests in, responses out. No Ray, no torch.

Every engine sees the same request row, built by :func:`to_request`::

    {"_idx": 3, "prompt": "How do I bake bread?", "seed": 1234567}

``prompt`` is the user turn (the instruction plus any suffix, before the chat template), ``seed``
the row's own sampling seed and ``_idx`` its position, which puts rows back in order after Ray Data.
Engines add ``generated_text``, ``num_generated_tokens`` and ``finish_reason``, and
:func:`from_response` turns that into the ``response`` column. The engine-specific shapes (an OpenAI
chat payload, a ``ray.data.llm`` vLLM row) are pure functions of the request row too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ray_fedit.config import GenerationConfig
from ray_fedit.data.templates import ALPACA, Template


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings shared by every engine.

    Args:
        max_new_tokens: generation stops after this many tokens, or at EOS.
        temperature: 0 is greedy decoding; above 0, sampling with that temperature.
        top_p: nucleus sampling mass (1.0 keeps the whole distribution).
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0

    @classmethod
    def from_config(cls, gen: GenerationConfig, *, temperature: float | None = None,
                    max_new_tokens: int | None = None) -> SamplingParams:
        """The config's sampling settings, with optional per-pipeline overrides."""
        return cls(max_new_tokens=gen.max_new_tokens if max_new_tokens is None else max_new_tokens,
                   temperature=gen.temperature if temperature is None else temperature,
                   top_p=gen.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def row_seed(*parts: Any) -> int:
    """A seed in [0, 2**31) derived from ``parts`` (stable across processes and Python versions).

    Row seeds come from the row's content, not its position, so a row samples the same text in any
    batch, order or actor.
    """
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31)


def to_request(row: Mapping[str, Any], idx: int, *, prompt_field: str, seed: int) -> dict[str, Any]:
    """The engine request of one input row.

    Args:
        row: any mapping holding the prompt; an int ``seed`` field, if present, is used as the row's
            seed (repeating one prompt with different seeds, as instruction generation does).
        idx: the row's position in the input.
        prompt_field: the field holding the user turn.
        seed: the base seed; a row's seed is derived from it and the prompt.

    Raises:
        KeyError: if the row lacks ``prompt_field``.
        ValueError: if the prompt is not a non-empty string.
    """
    prompt = row[prompt_field]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"row {idx}: field {prompt_field!r} must be a non-empty string, "
                         f"got {prompt!r:.80}")
    own = row.get("seed")
    return {"_idx": idx, "prompt": prompt,
            "seed": int(own) if isinstance(own, int) else row_seed(seed, prompt)}


def from_response(row: Mapping[str, Any]) -> dict[str, Any]:
    """The output columns of one engine row: ``response`` (stripped text) plus generation stats."""
    return {"_idx": int(row["_idx"]), "response": str(row["generated_text"]).strip(),
            "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
            "finish_reason": str(row.get("finish_reason") or "")}


# ------------------------------------------------------------------------------------ http
def chat_payload(request: Mapping[str, Any], sampling: SamplingParams,
                 model: str) -> dict[str, Any]:
    """An OpenAI ``/chat/completions`` body for one request row (seeded where servers allow)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": request["prompt"]}],
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": int(request["seed"]),
    }


def parse_chat_response(body: Mapping[str, Any]) -> dict[str, Any]:
    """``generated_text``, ``finish_reason`` and ``num_generated_tokens`` of a chat completion.

    Raises:
        ValueError: if the body has no ``choices[0].message.content``.
    """
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"not a chat completion (no choices[0].message.content): "
                         f"{json.dumps(body)[:200]}") from None
    usage = body.get("usage") or {}
    return {"generated_text": text or "", "finish_reason": choice.get("finish_reason") or "",
            "num_generated_tokens": int(usage.get("completion_tokens") or 0)}


# ------------------------------------------------------------------------------------ vllm
def vllm_request(request: Mapping[str, Any], sampling: SamplingParams, template: Template,
                 lora_name: str | None) -> dict[str, Any]:
    """A ``ray.data.llm`` vLLM row: chat messages (or an Alpaca prompt), sampling, optional LoRA.

    With the chat template the processor's chat-template stage renders ``messages``; with Alpaca
    that stage is off and the tokenizer stage reads ``prompt``. A ``model`` different from the base
    model makes vLLM apply that LoRA adapter to this row only.
    """
    row: dict[str, Any] = {
        "_idx": int(request["_idx"]),
        "sampling_params": {"max_tokens": sampling.max_new_tokens,
                            "temperature": sampling.temperature, "top_p": sampling.top_p,
                            "seed": int(request["seed"])},
    }
    if template == "alpaca":
        row["prompt"] = ALPACA.format(instruction=request["prompt"])
    else:
        row["messages"] = [{"role": "user", "content": request["prompt"]}]
    if lora_name is not None:
        row["model"] = lora_name
    return row


def vllm_output(row: Mapping[str, Any]) -> dict[str, Any]:
    """The engine columns of a vLLM output row (``generated_text`` and its token count)."""
    return {"_idx": int(row["_idx"]), "generated_text": row.get("generated_text") or "",
            "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
            "finish_reason": ""}

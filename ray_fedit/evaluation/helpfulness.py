"""Helpfulness: response NLL on held-out benign data, and MT-Bench first-turn questions.

Response NLL: the evaluated model's mean per-token negative log-likelihood of the reference response
given the instruction, over response tokens only, with the same prompt template, tokenization and
truncation as training (:func:`ray_fedit.federation.sft.tokenize_example`). Lower is better. Each
example's NLL is the mean over its own response tokens, and the summary is the mean over examples
(examples are the bootstrap unit). An example whose prompt fills ``max_seq_len`` has no response
tokens and is left out (counted as unparseable). Offline and cheap; it sees whether an attack or a
defense costs the model its ability to answer normal instructions.

MT-Bench questions (:func:`load_mt_bench`) are read from a local jsonl file or the hub: one row per
question with ``turns`` (a list; only the first turn is used), ``category``, ``question_id`` and,
for math/reasoning/coding, an optional ``reference`` list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_fedit.config import DataSourceConfig, ModelConfig
from ray_fedit.data.templates import Template
from ray_fedit.errors import DataError


def response_nll(model_cfg: ModelConfig, adapter_dir: str | None, pairs: list[tuple[str, str]], *,
                 template: Template, max_seq_len: int, batch_size: int,
                 torch_threads: int | None = None) -> list[float | None]:
    """Per-example mean NLL of each response given its instruction (in this process).

    Args:
        model_cfg: the base model.
        adapter_dir: a PEFT adapter applied on top, or None for the base model.
        pairs: ``(instruction, response)`` pairs.
        template: the prompt template the model was trained with.
        max_seq_len: truncation length (as in training).
        batch_size: examples per forward pass (padding is masked, so results do not depend on it).
        torch_threads: intra-op threads, or None to keep torch's default.

    Returns:
        One NLL per pair (nats per token), None where no response token survived truncation.
    """
    import torch

    from ray_fedit.generation.hf import load_generator_model

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_generator_model(model_cfg, adapter_dir, device)
    return model_nll(model, tok, pairs, template=template, max_seq_len=max_seq_len,
                     batch_size=batch_size)


def model_nll(model: Any, tok: Any, pairs: list[tuple[str, str]], *, template: Template,
              max_seq_len: int, batch_size: int) -> list[float | None]:
    """:func:`response_nll` on a loaded model (its adapter, if any, already merged)."""
    import torch

    from ray_fedit.federation.sft import IGNORE_INDEX, collate, tokenize_example

    examples = [tokenize_example(tok, i, r, template=template, max_seq_len=max_seq_len)
                for i, r in pairs]
    out: list[float | None] = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"].to(model.device),
                           attention_mask=batch["attention_mask"].to(model.device)).logits.float()
            labels = batch["labels"][:, 1:].to(model.device)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            counts = (labels != IGNORE_INDEX).sum(dim=1)
            for total, n in zip(nll.sum(dim=1).tolist(), counts.tolist(), strict=True):
                out.append(total / n if n else None)
    return out


def load_mt_bench(src: DataSourceConfig) -> list[dict[str, Any]]:
    """MT-Bench questions as ``{"question_id", "category", "instruction", "reference"}`` rows.

    ``src.instruction_field`` names the turns field (``turns`` in FastChat's ``question.jsonl``); a
    list value gives its first turn, a string value is used as is.

    Raises:
        DataError: for a missing or empty file, a bad line, or a row without the instruction
            field.
    """
    if src.kind == "jsonl":
        path = Path(src.path)
        if not path.is_file():
            raise DataError(f"MT-Bench questions file {str(path)!r} does not exist")
        rows = []
        for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: not valid UTF-8 ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{i}", row))
        if not rows:
            raise DataError(f"{path}: no MT-Bench questions (the file holds no rows); point "
                            "evaluation.mt_bench.path at FastChat's question.jsonl")
    elif src.kind == "hub":
        import datasets

        ds = datasets.load_dataset(src.path, src.subset, split=src.split)
        rows = [(f"{src.path}[{src.split}] row {i}", r) for i, r in enumerate(ds)]
    else:
        raise DataError(f"evaluation.mt_bench.kind={src.kind!r}: MT-Bench questions come from a "
                        "jsonl file or the hub (kind: jsonl | hub)")
    out = []
    for where, row in rows:
        turns = row.get(src.instruction_field)
        first = turns[0] if isinstance(turns, list) and turns else turns
        if not isinstance(first, str) or not first.strip():
            raise DataError(f"{where}: field {src.instruction_field!r} must be a non-empty string "
                            f"or list of strings, got {turns!r:.80}")
        ref = row.get("reference")
        out.append({"question_id": row.get("question_id", len(out)),
                    "category": str(row.get("category") or "unknown"), "instruction": first,
                    "reference": ref[0] if isinstance(ref, list) and ref else ref})
        if src.limit is not None and len(out) >= src.limit:
            break
    return out

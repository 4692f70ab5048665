"""Build the configured judges and run them where they belong (inline, in a Ray task, or remotely).

A judge in ``JUDGES`` is either a plain ``judge(instructions, responses) -> list[dict]`` function
(the rule judge) or, with registry metadata ``factory=True``, a factory
``build(cfg, complete=None) -> judge`` for judges that need a model or an endpoint. This module
supplies the one thing judges may not build themselves (``judges/`` never imports an engine): the
``complete`` function that runs ``evaluation.judge_model`` on raw judge prompts.

- ``judge_engine: hf``: transformers loads the judge model and decodes greedily, batch by batch,
  from the raw prompt (the tokenizer adds BOS). The generation engines wrap user turns in a chat
  or Alpaca template, which would corrupt a judge's own prompt format, so this path decodes raw
  prompts itself.
- ``judge_engine: http``: an OpenAI-compatible ``/completions`` endpoint (e.g. vLLM serving
  MD-Judge, as the paper did) at ``judge_http``, at temperature 0; the raw prompt goes in as is.

Judges marked ``run_in_task=True`` (the judge model, the reward model) are meant to run in a Ray
worker (evaluation runs them in one task), so their weights never load in the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ray_fedit.config import HttpEngineConfig, ModelConfig, RunConfig
from ray_fedit.judges.llm_http import post_each
from ray_fedit.registry import JUDGES

JudgeFn = Callable[[Sequence[str], Sequence[str]], list[dict[str, Any]]]


def hf_complete(model_cfg: ModelConfig, prompts: list[str], *, max_new_tokens: int,
                batch_size: int) -> list[str]:
    """Greedy continuations of raw prompts with a transformers causal LM (in this process).

    Args:
        model_cfg: the judge model (hub id, directory, bundled or tiny model).
        prompts: complete prompts; the tokenizer adds its special tokens (BOS).
        max_new_tokens: the most tokens per continuation.
        batch_size: prompts per ``generate`` call.

    Returns:
        One continuation per prompt, up to (not including) EOS, special tokens skipped.
    """
    import torch

    from ray_fedit.generation.hf import eos_token_ids
    from ray_fedit.models.loading import load_model_and_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model_and_tokenizer(model_cfg, device=device)
    tok.padding_side = "left"  # continue from the right end of every row
    eos = eos_token_ids(model, tok)
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            enc = tok(batch, return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                end = next((i for i, t in enumerate(row) if t in eos), len(row))
                out.append(tok.decode(row[:end], skip_special_tokens=True))
    return out


def _completion_text(payload: dict[str, Any]) -> str:
    """``choices[0].text`` of a completions reply, as a string.

    Raises:
        ValueError: the reply has no ``choices[0].text``.
    """
    try:
        return str(payload["choices"][0]["text"])
    except (KeyError, IndexError, TypeError):
        raise ValueError("reply is not a completion with choices[0].text") from None


def http_complete(http: HttpEngineConfig, prompts: list[str], *, max_new_tokens: int) -> list[str]:
    """Greedy continuations of raw prompts from an OpenAI-compatible ``/completions`` endpoint.

    Transient failures are retried as in :func:`ray_fedit.judges.llm_http.post_each`.

    Raises:
        HttpJudgeError: when a request still fails after ``http.max_retries`` retries.
    """
    bodies = [{"model": http.model, "prompt": prompt, "temperature": 0.0,
               "max_tokens": max_new_tokens} for prompt in prompts]
    return post_each(http, "/completions", bodies, _completion_text,
                     hint="check evaluation.judge_http")


def judge_model_complete(cfg: RunConfig) -> Callable[[list[str]], list[str]]:
    """The completion function of ``evaluation.judge_model`` on ``evaluation.judge_engine``.

    It runs in the calling process (the ``judge_model`` judge is run inside a Ray task).
    """
    ev = cfg.evaluation
    if ev.judge_engine == "http":
        return lambda prompts: http_complete(ev.judge_http, prompts,
                                             max_new_tokens=ev.judge_max_new_tokens)
    assert ev.judge_model is not None  # EvaluationConfig enforces it when judge_model is used
    model_cfg = ModelConfig(name=ev.judge_model, tiny=cfg.model.tiny)
    return lambda prompts: hf_complete(model_cfg, prompts, max_new_tokens=ev.judge_max_new_tokens,
                                       batch_size=ev.judge_batch_size)


def build_judge(name: str, cfg: RunConfig, loaded: tuple[Any, Any] | None = None) -> JudgeFn:
    """The ready-to-call judge registered as ``name``, configured from ``cfg`` (in this process).

    ``loaded`` is a ``(model, tokenizer)`` already in memory, handed to a judge registered with
    ``reads_model`` (a function of ``cfg`` giving the model config it reads) instead of loading
    its own; the caller checks they come from that config (:func:`reads_loaded_model`).
    """
    entry = JUDGES.get(name)
    meta = JUDGES.meta(name)
    if not meta.get("factory"):
        return entry
    complete = judge_model_complete(cfg) if name == "judge_model" else None
    if loaded is not None and meta.get("reads_model"):
        return entry(cfg, complete=complete, loaded=loaded)
    return entry(cfg, complete=complete)


def reads_loaded_model(names: Sequence[str], cfg: RunConfig, model_cfg: ModelConfig) -> bool:
    """Whether every judge of ``names`` that needs a model reads ``model_cfg`` itself, so one
    loaded copy of it can serve them all (``reads_model`` metadata)."""
    for name in names:
        meta = JUDGES.meta(name)
        if not meta.get("needs_model"):
            continue
        reads = meta.get("reads_model")
        if reads is None or reads(cfg) != model_cfg:
            return False
    return True


def split_judges(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """``(in-process judges, judges for the model task)`` of ``cfg.evaluation.judges``, in order."""
    names = cfg.evaluation.judges
    in_task = [n for n in names if JUDGES.meta(n).get("run_in_task")]
    return [n for n in names if n not in in_task], in_task


def run_judges(names: list[str], cfg: RunConfig,
               batches: dict[str, tuple[list[str], list[str]]],
               refusal_batches: dict[str, tuple[list[str], list[str]]] | None = None,
               loaded: tuple[Any, Any] | None = None) -> dict[str, dict[str, list]]:
    """Run judges on several batches of pairs in this process, building each judge once.

    A model judge thus loads its weights once for every benchmark, and is released before the next
    judge loads.

    Args:
        names: registered judge names.
        cfg: the run config.
        batches: ``{batch key (a benchmark name): (instructions, responses)}``.
        refusal_batches: more batches (benign prompts) for the judges that tell refusals
            (registered with ``refusal=True``) only; their keys must differ from ``batches``'.
        loaded: a loaded ``(model, tokenizer)`` for the judges that read it (see
            :func:`build_judge`).

    Returns:
        ``{batch key: {judge name: one output dict per pair}}``.

    Raises:
        RuntimeError: if a judge returned a different number of rows than it was given.
    """
    refusal_batches = refusal_batches or {}
    out: dict[str, dict[str, list]] = {key: {} for key in (*batches, *refusal_batches)}
    for name in names:
        judge = build_judge(name, cfg, loaded)
        mine = {**batches, **refusal_batches} if JUDGES.meta(name).get("refusal") else batches
        for key, (instructions, responses) in mine.items():
            rows = judge(instructions, responses)
            if len(rows) != len(responses):
                raise RuntimeError(f"judge {name!r} returned {len(rows)} rows for "
                                   f"{len(responses)} pairs")
            out[key][name] = rows
        del judge
    return out

"""Supervised fine-tuning of a LoRA model on instruction records: the local step loop.

Reusable outside federation (the post-hoc defense fine-tunes the global adapter with it), so nothing
here knows about Ray, rounds or clients:

- :func:`tokenize_example` / :func:`tokenize_records`: the prompt (chat template or Alpaca, via
  ``format_example``) and the response are tokenized separately and concatenated, so the boundary
  is exact; labels are -100 on the prompt, so the loss covers response tokens (and the closing EOS)
  only. Truncation keeps the first ``max_seq_len`` tokens.
- :func:`collate`: right padding; padding gets attention 0 and label -100.
- :func:`response_loss`: summed next-token cross-entropy over labelled positions, and their count.
- :func:`batch_order`: which examples each micro-batch of each step uses, from a seeded Generator.
- :func:`train_steps`: ``steps`` optimizer steps of AdamW (fresh per call) with gradient
  accumulation, gradient clipping, an optional proximal term (FedProx) and an optional per-step
  parameter correction (SCAFFOLD). The loss of a step is the mean over every response token of its
  ``grad_accum`` micro-batches, exactly as if they were one batch.
- :class:`ParamView`: a model's trainable LoRA tensors as one flat fp32 vector in the adapter
  codec's order (load an adapter into the model, read the trained one back).
- :func:`cosine_learning_rate`: the paper's cosine schedule (per round in FedIT; usable per step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ray_fedit.data.templates import Template, format_example
from ray_fedit.models.codec import AdapterCodec

IGNORE_INDEX = -100


def cosine_learning_rate(round_index: int, num_rounds: int, lr: float, lr_min: float) -> float:
    """The paper's cosine schedule (OpenFedLLM ``cosine_learning_rate``).

    ``lr_min + 0.5 * (lr - lr_min) * (1 + cos(pi * round / num_rounds))``: ``lr`` at round 0, the
    midpoint of ``lr`` and ``lr_min`` at ``num_rounds / 2``. FedIT keeps it constant within a round.
    """
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * round_index / num_rounds))


# ------------------------------------------------------------------------------------ tokenization
@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence: token ids and labels (-100 where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_target_tokens(self) -> int:
        """Tokens that carry loss (response tokens that survived truncation)."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def tokenize_example(tokenizer: Any, instruction: str, response: str, *, template: Template,
                     max_seq_len: int) -> TokenizedExample:
    """Tokenize one (instruction, response) pair with loss on the response only.

    The chat template already writes the model's special tokens, so no more are added; the Alpaca
    template is plain text, so the tokenizer's own (e.g. a Llama BOS) are. Truncation keeps the
    first ``max_seq_len`` tokens, so an overlong prompt leaves an example without loss tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (with an EOS token).
        instruction: the user turn.
        response: the assistant turn.
        template: ``"chat"`` (the tokenizer's chat template) or ``"alpaca"``.
        max_seq_len: the longest sequence kept.

    Returns:
        The example; ``labels[i] == input_ids[i]`` on response tokens, -100 on prompt tokens.
    """
    prompt, full = format_example(tokenizer, instruction, response, template)
    prompt_ids = tokenizer(prompt, add_special_tokens=template == "alpaca")["input_ids"]
    response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    ids = (list(prompt_ids) + list(response_ids))[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + list(response_ids))[:max_seq_len]
    return TokenizedExample(tuple(ids), tuple(labels))


def tokenize_records(tokenizer: Any, records: Iterable[Mapping[str, Any]], *, template: Template,
                     max_seq_len: int) -> list[TokenizedExample]:
    """:func:`tokenize_example` over records (``instruction``/``response`` fields)."""
    return [tokenize_example(tokenizer, r["instruction"], r["response"], template=template,
                             max_seq_len=max_seq_len) for r in records]


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: ``input_ids``, ``attention_mask`` and ``labels`` (int64)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_targets(labels: torch.Tensor) -> int:
    """Positions that carry loss after the next-token shift (label at t is predicted at t-1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there are.

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)``, -100 where no loss is taken.

    Returns:
        ``(loss_sum, num_tokens)``; the mean is ``loss_sum / num_tokens``.
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX,
                                             reduction="sum")
    return loss, count_targets(labels)


def batch_order(num_examples: int, steps: int, batch_size: int, grad_accum: int,
                rng: np.random.Generator) -> np.ndarray:
    """Example indices for every micro-batch: shape ``(steps, grad_accum, batch_size)``.

    Epochs are consecutive permutations of ``range(num_examples)`` drawn from ``rng``, so every
    example is used once before any is used twice; a small shard is cycled.
    """
    needed = steps * grad_accum * batch_size
    epochs = math.ceil(needed / num_examples)
    flat = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])[:needed]
    return flat.reshape(steps, grad_accum, batch_size)


# ------------------------------------------------------------------------------- flat LoRA params
class ParamView:
    """A PEFT model's trainable adapter tensors, in the codec's order, as one flat fp32 vector.

    Writes go straight into the parameters (no state-dict round trip), so loading the global adapter
    before each client task is one copy.

    Args:
        model: a PEFT model with one active adapter.
        codec: the layout of ``adapter_state(model)`` (PEFT state-dict keys).

    Raises:
        ValueError: if the model's trainable tensors do not match the codec's names and shapes.
    """

    def __init__(self, model: Any, codec: AdapterCodec) -> None:
        adapter = getattr(model, "active_adapter", "default")
        # PEFT state-dict keys are parameter names without the adapter name (".default").
        by_key = {n.replace(f".{adapter}.", "."): p for n, p in model.named_parameters()
                  if p.requires_grad}
        if set(by_key) != set(codec.names):
            raise ValueError(f"trainable parameters {sorted(set(by_key) ^ set(codec.names))[:3]} "
                             "do not match the adapter codec")
        self.codec = codec
        self.params: list[torch.nn.Parameter] = [by_key[n] for n in codec.names]
        for p, shape in zip(self.params, codec.shapes, strict=True):
            if tuple(p.shape) != shape:
                raise ValueError(f"parameter of shape {tuple(p.shape)} != codec shape {shape}")

    def get_flat(self) -> np.ndarray:
        """The adapter as a new fp32 vector of length ``codec.dim``."""
        return np.concatenate([p.detach().to("cpu", torch.float32).reshape(-1).numpy()
                               for p in self.params]).astype(np.float32, copy=False)

    def set_flat(self, vector: np.ndarray) -> None:
        """Copy a vector of length ``codec.dim`` into the parameters."""
        offset = 0
        with torch.no_grad():
            for p, size in zip(self.params, self.codec.sizes, strict=True):
                # np.array copies: the vector may be a read-only view of Ray's object store.
                chunk = torch.from_numpy(np.array(vector[offset:offset + size], dtype=np.float32))
                p.copy_(chunk.view(p.shape))
                offset += size

    def split(self, vector: np.ndarray, device: torch.device | str) -> list[torch.Tensor]:
        """A flat vector as tensors shaped like the parameters (for anchors and corrections)."""
        out, offset = [], 0
        for p, size in zip(self.params, self.codec.sizes, strict=True):
            chunk = torch.from_numpy(np.array(vector[offset:offset + size], dtype=np.float32))
            out.append(chunk.view(p.shape).to(device=device, dtype=p.dtype))
            offset += size
        return out


# ------------------------------------------------------------------------------------ train loop
@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one call of :func:`train_steps`.

    Attributes:
        steps: optimizer steps.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per step.
        lr: a constant learning rate, or a function ``step -> lr``.
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the gradient's global L2 norm to this; None to skip clipping.
        prox_mu: FedProx coefficient: adds ``prox_mu / 2 * ||w - anchor||^2`` to each step's loss.
    """

    steps: int
    batch_size: int
    grad_accum: int = 1
    lr: float | Callable[[int], float] = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    prox_mu: float = 0.0


@dataclass
class TrainStats:
    """What one call of :func:`train_steps` did."""

    step_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    tokens: int = 0
    examples: int = 0
    empty_steps: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        """Mean response-token loss over the steps that had any response tokens."""
        real = [v for v in self.step_losses if not math.isnan(v)]
        return float(np.mean(real)) if real else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "step_losses": self.step_losses, "grad_norms": self.grad_norms,
                "tokens": self.tokens, "examples": self.examples, "empty_steps": self.empty_steps,
                "train_seconds": self.seconds}


def train_steps(
    model: Any,
    params: Sequence[torch.nn.Parameter],
    examples: Sequence[TokenizedExample],
    order: np.ndarray,
    cfg: TrainConfig,
    *,
    pad_id: int,
    anchor: Sequence[torch.Tensor] | None = None,
    correction: Sequence[torch.Tensor] | None = None,
) -> TrainStats:
    """Run ``cfg.steps`` AdamW steps on ``examples`` in the given order.

    A fresh AdamW is built for every call (the paper re-creates it every round). Each step's loss is
    the summed response-token cross-entropy of its micro-batches divided by their total token count,
    so gradient accumulation equals one large batch. A step whose micro-batches hold no response
    token (all truncated away) takes no optimizer step and records a NaN loss.

    Args:
        model: a causal LM (e.g. a PEFT model) on its device; put in train mode during the call.
        params: the tensors to train (e.g. ``ParamView.params``).
        examples: tokenized examples.
        order: ``(steps, grad_accum, batch_size)`` indices into ``examples`` (:func:`batch_order`).
        cfg: the loop's hyper-parameters.
        pad_id: the tokenizer's pad token id.
        anchor: FedProx reference weights (same shapes as ``params``); needed when ``prox_mu > 0``.
        correction: SCAFFOLD's ``c - c_i`` per parameter; after every optimizer step the parameters
            move by ``-lr * correction`` (OpenFedLLM's SCAFFOLD callback).

    Returns:
        Per-step losses and gradient norms, token and example counts, seconds.
    """
    if cfg.prox_mu > 0 and anchor is None:
        raise ValueError("prox_mu > 0 needs the anchor weights (the global adapter)")
    if order.shape != (cfg.steps, cfg.grad_accum, cfg.batch_size):
        raise ValueError(f"order has shape {order.shape}, expected "
                         f"{(cfg.steps, cfg.grad_accum, cfg.batch_size)}")
    t0 = time.perf_counter()
    device = params[0].device
    lr_at = cfg.lr if callable(cfg.lr) else (lambda _step, _lr=cfg.lr: _lr)
    optimizer = torch.optim.AdamW(params, lr=lr_at(0), weight_decay=cfg.weight_decay)
    stats = TrainStats()
    model.train()
    try:
        for step in range(cfg.steps):
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [collate([examples[int(i)] for i in micro], pad_id) for micro in order[step]]
            n_tokens = sum(count_targets(b["labels"]) for b in batches)
            stats.examples += sum(len(micro) for micro in order[step])
            if n_tokens == 0:
                stats.step_losses.append(float("nan"))
                stats.grad_norms.append(0.0)
                stats.empty_steps += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for k, b in enumerate(batches):
                logits = model(input_ids=b["input_ids"].to(device),
                               attention_mask=b["attention_mask"].to(device)).logits
                summed, _ = response_loss(logits, b["labels"].to(device))
                loss = summed / n_tokens
                if cfg.prox_mu > 0 and k == 0:  # once per step, not once per micro-batch
                    loss = loss + cfg.prox_mu / 2 * sum(
                        ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss.backward()
                loss_sum += float(summed.detach())
            if cfg.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            optimizer.step()
            if correction is not None:
                with torch.no_grad():
                    for p, c in zip(params, correction, strict=True):
                        p.sub_(lr * c)
            stats.step_losses.append(loss_sum / n_tokens)
            stats.grad_norms.append(float(norm))
            stats.tokens += n_tokens
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
    stats.seconds = time.perf_counter() - t0
    return stats

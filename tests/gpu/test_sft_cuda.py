"""The LoRA train step of ``ray_fedit.federation.sft`` on CUDA, in fp32 and bf16, against CPU fp32.

One fixed batch: the first 8 records of ``tests/assets/benign_tiny.jsonl``, chat template, at most
64 tokens, the tiny random Llama with LoRA r=8 on q/k/v/o and no dropout. The adapter starts from a
seeded random vector (A and B both non-zero, so every LoRA tensor gets a gradient; a fresh adapter
has B = 0 and no gradient on A). One AdamW step at lr 1e-3 without clipping gives the delta.

Tolerances, from measurements on CPU (``||a - b|| / ||b||`` is the relative L2 error of delta a
against delta b):

- fp32 on CUDA vs fp32 on CPU: relative error <= 1e-3. CPU fp32 against CPU fp64 measured 8e-7;
  the bound leaves room for other reduction orders but fails on TF32 matmuls or a wrong gradient.
- bf16 on CUDA vs fp32 on CPU: cosine >= 0.98 and relative error <= 0.25. CPU bf16 against CPU
  fp32 measured cosine 0.996 and relative error 0.084 (Adam's first step is nearly lr * sign(g), so
  coordinates with tiny gradients flip under bf16 noise).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.gpu.tiny_models import ROOT

RECORDS = [json.loads(line) for line in
           (ROOT / "tests/assets/benign_tiny.jsonl").read_text().splitlines()[:8]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

pytestmark = pytest.mark.usefixtures("needs_bundled_tokenizer")


def _train(device, dtype: str, init: np.ndarray | None, *, steps: int, lr: float):
    """``steps`` AdamW steps on the fixed batch from ``init`` (None: a seeded random vector).

    Returns:
        ``(delta, init, stats, peft_model, base weight before training)``.
    """
    import torch

    from ray_fedit.config import TINY_MODEL, LoraConfig, ModelConfig
    from ray_fedit.federation.sft import ParamView, TrainConfig, tokenize_records, train_steps
    from ray_fedit.models.codec import AdapterCodec
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, wrap_lora

    model, tok = load_model_and_tokenizer(ModelConfig(name=TINY_MODEL, dtype=dtype), device)
    peft_model = wrap_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=TARGETS))
    view = ParamView(peft_model, AdapterCodec.from_state_dict(adapter_state(peft_model)))
    if init is None:
        init = (np.random.default_rng(0).standard_normal(view.codec.dim) * 0.05).astype(np.float32)
    view.set_flat(init)
    examples = tokenize_records(tok, RECORDS, template="chat", max_seq_len=64)
    order = np.tile(np.arange(len(examples)), (steps, 1, 1))  # the same batch at every step
    base = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    base_before = base.detach().clone()
    stats = train_steps(peft_model, view.params, examples, order,
                        TrainConfig(steps=steps, batch_size=len(examples), lr=lr,
                                    max_grad_norm=None),
                        pad_id=tok.pad_token_id)
    assert all(p.device.type == torch.device(device).type for p in view.params)
    return view.get_flat() - init, init, stats, peft_model, base_before


@pytest.fixture(scope="module")
def cpu_step():
    """The reference: one step in fp32 on CPU."""
    import torch

    torch.set_num_threads(2)
    delta, init, stats, _, _ = _train("cpu", "float32", None, steps=1, lr=1e-3)
    return delta, init, stats


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_fp32_step_on_cuda_matches_the_cpu_step(device, cpu_step, strict_fp32):
    ref, init, ref_stats = cpu_step
    delta, _, stats, _, _ = _train(device, "float32", init, steps=1, lr=1e-3)
    assert _rel(delta, ref) <= 1e-3
    assert stats.step_losses[0] == pytest.approx(ref_stats.step_losses[0], rel=1e-5)
    assert stats.grad_norms[0] == pytest.approx(ref_stats.grad_norms[0], rel=1e-4)
    assert stats.tokens == ref_stats.tokens


def test_bf16_step_on_cuda_tracks_the_cpu_fp32_step(device, cpu_step):
    import torch

    ref, init, ref_stats = cpu_step
    delta, _, stats, model, _ = _train(device, "bfloat16", init, steps=1, lr=1e-3)
    # PEFT keeps the adapter in fp32 over a bf16 base model (autocast_adapter_dtype)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert {p.dtype for p in lora} == {torch.float32}
    assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16
    assert _cos(delta, ref) >= 0.98 and _rel(delta, ref) <= 0.25
    assert stats.step_losses[0] == pytest.approx(ref_stats.step_losses[0], rel=1e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loss_falls_and_only_the_adapter_moves(device, dtype):
    """10 steps at lr 5e-3 on one batch: on CPU the loss went 10.90 -> 10.48 in both dtypes."""
    import torch

    delta, _, stats, model, base_before = _train(device, dtype, None, steps=10, lr=5e-3)
    losses = stats.step_losses
    assert all(np.isfinite(losses)) and np.isfinite(delta).all()
    assert losses[-1] < losses[0] - 0.1, losses
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(base, base_before)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cuda_step_is_reproducible_bitwise(device, cpu_step, dtype):
    """The trainer worker promises bitwise equal deltas for the same task; it runs with
    ``torch.use_deterministic_algorithms(True, warn_only=True)``, as here."""
    import torch

    _, init, _ = cpu_step
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, _, _, _, _ = _train(device, dtype, init, steps=2, lr=1e-3)
        second, _, _, _, _ = _train(device, dtype, init, steps=2, lr=1e-3)
    finally:
        torch.use_deterministic_algorithms(before)
    assert np.array_equal(first, second)

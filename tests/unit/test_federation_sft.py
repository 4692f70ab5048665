"""The local SFT loop: response-only masking, the loss, batch order, and the training step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ray_fedit.data.templates import ALPACA
from ray_fedit.federation.sft import (
    IGNORE_INDEX,
    ParamView,
    TokenizedExample,
    TrainConfig,
    batch_order,
    collate,
    response_loss,
    tokenize_example,
    tokenize_records,
    train_steps,
)


class CharTokenizer:
    """One token per character (its code point); BOS = 1 when special tokens are added."""

    eos_token = "\x03"
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_alpaca_masks_the_prompt_and_keeps_response_and_eos():
    """ids = [BOS] + prompt chars + "Hi" + EOS; labels = -100 on BOS and the prompt."""
    tok = CharTokenizer()
    ex = tokenize_example(tok, "Say hi", "Hi", template="alpaca", max_seq_len=1000)
    prompt = ALPACA.format(instruction="Say hi")
    assert ex.input_ids == (1, *map(ord, prompt), ord("H"), ord("i"), 3)
    assert ex.labels == (IGNORE_INDEX,) * (1 + len(prompt)) + (ord("H"), ord("i"), 3)
    assert ex.num_target_tokens == 3


def test_truncation_keeps_the_first_tokens():
    tok = CharTokenizer()
    prompt_len = 1 + len(ALPACA.format(instruction="Say hi"))
    ex = tokenize_example(tok, "Say hi", "Hello", template="alpaca", max_seq_len=prompt_len + 2)
    assert len(ex.input_ids) == prompt_len + 2
    assert ex.labels[-2:] == (ord("H"), ord("e"))
    only_prompt = tokenize_example(tok, "Say hi", "Hello", template="alpaca", max_seq_len=10)
    assert only_prompt.num_target_tokens == 0


def test_chat_template_masking_with_the_real_tokenizer():
    """SmolLM2's ChatML: the labelled tokens decode to exactly the response plus <|im_end|>."""
    from ray_fedit.models.loading import load_tokenizer

    tok = load_tokenizer("tiny-random-llama")
    ex = tokenize_example(tok, "What is 2+2?", "Four.", template="chat", max_seq_len=256)
    target = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(target) == "Four.<|im_end|>"
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert tok.decode(list(ex.input_ids[:first])).endswith("<|im_start|>assistant\n")
    assert list(ex.labels[first:]) == list(ex.input_ids[first:])


def test_collate_pads_right_with_ignored_labels():
    a = TokenizedExample((5, 6, 7), (IGNORE_INDEX, 6, 7))
    b = TokenizedExample((8,), (8,))
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_response_loss_by_hand():
    """Vocab 2. Labels [-100, 1, 0]: position 0 predicts 1, position 1 predicts 0.

    Position 0 logits [0, ln 3] -> p(1) = 3/4 -> CE = ln(4/3); position 1 logits [0, 0] -> ln 2.
    Position 2 predicts nothing (no next token). Sum = ln(4/3) + ln 2, count = 2.
    """
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    loss, n = response_loss(logits, labels)
    assert n == 2
    assert float(loss) == pytest.approx(math.log(4 / 3) + math.log(2), rel=1e-6)
    loss, n = response_loss(logits, torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]]))
    assert n == 1 and float(loss) == pytest.approx(math.log(2), rel=1e-6)


def test_batch_order_uses_each_example_once_per_epoch():
    order = batch_order(5, steps=3, batch_size=2, grad_accum=2, rng=np.random.default_rng(0))
    assert order.shape == (3, 2, 2)
    flat = order.reshape(-1)
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4] and sorted(flat[5:10]) == [0, 1, 2, 3, 4]
    again = batch_order(5, steps=3, batch_size=2, grad_accum=2, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(order, again)


# --------------------------------------------------------------------------- the training loop
@pytest.fixture(scope="module")
def tiny_lora():
    from ray_fedit.config import LoraConfig, ModelConfig
    from ray_fedit.models.codec import AdapterCodec
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, wrap_lora

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: one thread avoids OpenMP barriers on busy cores
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))
    model = wrap_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    codec = AdapterCodec.from_state_dict(adapter_state(model))
    view = ParamView(model, codec)
    records = [{"instruction": f"Question {i}?", "response": f"Answer number {i}."}
               for i in range(8)]
    examples = tokenize_records(tok, records, template="chat", max_seq_len=64)
    yield model, tok, view, examples
    torch.set_num_threads(threads)


def _run(tiny_lora, start, cfg, order, **kw):
    model, tok, view, examples = tiny_lora
    view.set_flat(start)
    stats = train_steps(model, view.params, examples, order, cfg, pad_id=tok.pad_token_id, **kw)
    return view.get_flat(), stats


def test_param_view_round_trips_the_codec_layout(tiny_lora):
    _, _, view, _ = tiny_lora
    vec = np.arange(view.codec.dim, dtype=np.float32) / view.codec.dim
    view.set_flat(vec)
    np.testing.assert_array_equal(view.get_flat(), vec)
    from ray_fedit.models.lora import adapter_state

    np.testing.assert_array_equal(view.codec.flatten(adapter_state(tiny_lora[0])), vec)


def test_grad_accumulation_equals_one_big_batch(tiny_lora):
    """One step on 4 examples == one step on 2 micro-batches of 2 (the loss is token-normalized)."""
    start = tiny_lora[2].get_flat() + 0.01
    big, s1 = _run(tiny_lora, start, TrainConfig(steps=1, batch_size=4, lr=1e-2),
                   np.array([[[0, 1, 2, 3]]]))
    acc, s2 = _run(tiny_lora, start, TrainConfig(steps=1, batch_size=2, grad_accum=2, lr=1e-2),
                   np.array([[[0, 1], [2, 3]]]))
    assert s1.loss == pytest.approx(s2.loss, rel=1e-5)
    assert s1.tokens == s2.tokens > 0
    np.testing.assert_allclose(big, acc, atol=1e-6)
    assert not np.allclose(big, start)  # it trained


def test_training_is_deterministic_and_lowers_the_loss(tiny_lora):
    start = tiny_lora[2].get_flat()
    order = np.tile(np.array([[[0, 1, 2, 3]]]), (4, 1, 1))
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2)
    a, sa = _run(tiny_lora, start, cfg, order)
    b, _ = _run(tiny_lora, start, cfg, order)
    np.testing.assert_array_equal(a, b)
    assert sa.step_losses[-1] < sa.step_losses[0]
    assert sa.examples == 16


def test_scaffold_correction_moves_params_by_minus_lr_c(tiny_lora):
    """With lr = 0 AdamW does nothing, so the step is exactly the correction: w -= lr * c.

    A tiny lr (1e-3) and weight_decay 0 bound Adam's own move by ~lr per coordinate; compare the
    two runs' difference instead: (with - without) == -lr * c, since the correction does not feed
    back into the gradient of a single step.
    """
    _, _, view, _ = tiny_lora
    start = view.get_flat()
    order = np.array([[[0, 1]]])
    cfg = TrainConfig(steps=1, batch_size=2, lr=1e-3)
    c = np.full(view.codec.dim, 2.0, dtype=np.float32)
    plain, _ = _run(tiny_lora, start, cfg, order)
    corrected, _ = _run(tiny_lora, start, cfg, order,
                        correction=view.split(c, "cpu"))
    np.testing.assert_allclose(corrected - plain, -1e-3 * c, atol=1e-7)


def test_fedprox_pulls_towards_the_anchor(tiny_lora):
    """A huge prox_mu makes the proximal gradient dominate: training ends closer to the anchor."""
    _, _, view, _ = tiny_lora
    start = view.get_flat()
    anchor_vec = start + 0.05
    order = np.tile(np.array([[[0, 1]]]), (5, 1, 1))
    plain, _ = _run(tiny_lora, start, TrainConfig(steps=5, batch_size=2, lr=1e-2,
                                                  max_grad_norm=None), order)
    prox, _ = _run(tiny_lora, start, TrainConfig(steps=5, batch_size=2, lr=1e-2, prox_mu=100.0,
                                                 max_grad_norm=None), order,
                   anchor=view.split(anchor_vec, "cpu"))
    assert np.linalg.norm(prox - anchor_vec) < np.linalg.norm(plain - anchor_vec)
    with pytest.raises(ValueError, match="anchor"):
        _run(tiny_lora, start, TrainConfig(steps=1, batch_size=2, prox_mu=1.0), order[:1])


def test_empty_steps_take_no_optimizer_step(tiny_lora):
    model, tok, view, _ = tiny_lora
    no_target = [TokenizedExample((5, 6, 7), (IGNORE_INDEX,) * 3)] * 2
    start = view.get_flat()
    view.set_flat(start)
    stats = train_steps(model, view.params, no_target, np.array([[[0, 1]]]),
                        TrainConfig(steps=1, batch_size=2, lr=1.0), pad_id=tok.pad_token_id)
    assert stats.empty_steps == 1 and math.isnan(stats.step_losses[0])
    np.testing.assert_array_equal(view.get_flat(), start)

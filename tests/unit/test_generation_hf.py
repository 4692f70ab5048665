"""The hf engine's core, in process (no Ray): row-seeded sampling, EOS handling, adapters."""

from __future__ import annotations

import math

import pytest
import torch

from ray_fedit.config import LoraConfig, ModelConfig
from ray_fedit.generation.hf import RowSeededGumbel, generate_batch, load_generator_model
from ray_fedit.generation.rows import SamplingParams
from ray_fedit.models.lora import adapter_state, load_adapter_state, save_adapter, wrap_lora

TINY = ModelConfig(name="tiny-random-llama")
PROMPTS = ["How do I bake bread?", "Name a fruit.", "Write a haiku about rain, please."]
SEEDS = [11, 22, 33]


@pytest.fixture(scope="module")
def tiny():
    # One thread: on a shared 2-core machine two OpenMP threads stall each other badly when
    # other processes run (measured 5x slower per step); alone, two are only a bit faster.
    torch.set_num_threads(1)
    return load_generator_model(TINY, None, "cpu")


def test_sampled_rows_do_not_depend_on_the_batch(tiny):
    """Each row draws its noise from its own generator, so batch = concatenation of singles."""
    model, tok = tiny
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9)
    batched = generate_batch(model, tok, PROMPTS, SEEDS, sp, "chat")
    singles = [generate_batch(model, tok, [p], [s], sp, "chat")[0]
               for p, s in zip(PROMPTS, SEEDS, strict=True)]
    reversed_ = generate_batch(model, tok, PROMPTS[::-1], SEEDS[::-1], sp, "chat")[::-1]
    assert batched == singles == reversed_
    assert all(r["finish_reason"] in ("stop", "length") for r in batched)


def test_seeds_change_samples_and_greedy_ignores_them(tiny):
    model, tok = tiny
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0)
    a = generate_batch(model, tok, PROMPTS[:1], [1], sampled, "chat")[0]["generated_text"]
    b = generate_batch(model, tok, PROMPTS[:1], [2], sampled, "chat")[0]["generated_text"]
    assert a != b
    greedy = SamplingParams(max_new_tokens=6)
    assert generate_batch(model, tok, PROMPTS[:1], [1], greedy, "alpaca") == \
        generate_batch(model, tok, PROMPTS[:1], [2], greedy, "alpaca")


def test_gumbel_noise_samples_the_softmax():
    """Gumbel-max: argmax(log p + G) ~ p. Probabilities (0.5, 0.3, 0.2), 4000 seeded rows."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    picks = RowSeededGumbel(list(range(4000)), 1.0, 1.0)(None, logits).argmax(-1)
    freq = torch.bincount(picks, minlength=3).float() / 4000
    # binomial std <= sqrt(0.25 / 4000) = 0.0079; allow 4 std
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.032)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    """p = (0.5, 0.3, 0.2): top_p 0.6 keeps {0, 1} (mass before token 2 is 0.8 >= 0.6); top_p 0.5
    keeps {0} (mass before token 1 is 0.5 >= 0.5)."""
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).repeat(2000, 1)  # shuffled order
    picks = RowSeededGumbel(list(range(2000)), 1.0, 0.6)(None, logits).argmax(-1)
    assert set(picks.tolist()) == {1, 2}
    picks = RowSeededGumbel(list(range(2000)), 1.0, 0.5)(None, logits).argmax(-1)
    assert set(picks.tolist()) == {1}


def test_temperature_sharpens():
    """T -> 0 concentrates on the argmax: at T=0.05 the 0.5 token wins every draw."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(500, 1)
    picks = RowSeededGumbel(list(range(500)), 0.05, 1.0)(None, logits).argmax(-1)
    assert picks.eq(0).all()


class _FakeModel:
    """Returns fixed continuations: row 0 stops at EOS (2), row 1 runs to the limit."""

    device = torch.device("cpu")

    class generation_config:  # noqa: N801  (mimics the attribute of a HF model)
        eos_token_id = 2

    def generate(self, input_ids, attention_mask, generation_config, logits_processor):
        assert generation_config.max_new_tokens == 5 and generation_config.do_sample is False
        new = torch.tensor([[72, 105, 2, 2, 2], [72, 72, 72, 72, 72]])
        return torch.cat([input_ids, new], dim=1)


def test_eos_ends_the_text_and_counts_as_a_token(tiny):
    """Row 0: tokens 72, 105, EOS, pad, pad -> 3 tokens (with EOS), "stop"; row 1: 5, "length"."""
    _, tok = tiny
    out = generate_batch(_FakeModel(), tok, ["a", "b"], [0, 0], SamplingParams(5), "alpaca")
    assert [o["num_generated_tokens"] for o in out] == [3, 5]
    assert [o["finish_reason"] for o in out] == ["stop", "length"]
    assert out[0]["generated_text"] == tok.decode([72, 105])
    assert out[1]["generated_text"] == tok.decode([72] * 5)


def test_an_adapter_is_merged_and_changes_the_model(tiny, tmp_path):
    base, tok = tiny
    torch.manual_seed(0)
    model, _ = load_generator_model(TINY, None, "cpu")
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = wrap_lora(model, lora).eval()  # eval: no LoRA dropout
    # Random B (PEFT initialises B to zero, which would make the adapter a no-op).
    state = {k: torch.randn_like(v) * 0.5 for k, v in adapter_state(peft_model).items()}
    load_adapter_state(peft_model, state)
    save_adapter(state, lora, tmp_path)
    merged, _ = load_generator_model(TINY, tmp_path, "cpu")

    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logits = base(**enc).logits
        merged_logits = merged(**enc).logits
        peft_logits = peft_model(**enc).logits
    assert not torch.allclose(base_logits, merged_logits, atol=1e-3)
    assert torch.allclose(merged_logits, peft_logits, atol=1e-4)
    assert math.isfinite(merged_logits.abs().max().item())

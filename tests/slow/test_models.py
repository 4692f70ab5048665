"""The bundled SmolLM2 loads offline; adapters round-trip through PEFT's own loader."""

from __future__ import annotations

import pytest
import torch

from ray_fedit.config import LoraConfig, ModelConfig
from ray_fedit.data.templates import format_example
from ray_fedit.models import loading
from ray_fedit.models.codec import AdapterCodec
from ray_fedit.models.lora import (
    adapter_state,
    load_adapter,
    load_adapter_state,
    save_adapter,
    wrap_lora,
)


@pytest.fixture(scope="module")
def smollm2():
    return loading.load_model_and_tokenizer(ModelConfig())


def test_bundled_model_is_smollm2_135m(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.pad_token is not None and tok.chat_template is not None


def test_later_loads_read_the_hf_cache_not_the_gguf(smollm2, monkeypatch):
    def fail(*_a, **_k):
        raise AssertionError("converted the GGUF again")

    monkeypatch.setattr(loading, "_convert_gguf", fail)
    model, _ = loading.load_model_and_tokenizer(ModelConfig())
    ref = smollm2[0].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_chat_template_example_ends_with_eos(smollm2):
    _, tok = smollm2
    prompt, full = format_example(tok, "Say hi.", "Hi!", "chat")
    assert "<|im_start|>user\nSay hi.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n") and full == prompt + "Hi!" + tok.eos_token


def test_adapter_saved_in_peft_format_reloads_exactly(tmp_path):
    from peft import PeftModel

    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model, tok = loading.load_model_and_tokenizer(ModelConfig())
    peft_model = wrap_lora(model, lora)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) for k, v in adapter_state(peft_model).items()}
    save_adapter(state, lora, tmp_path / "adapter", base_model="smollm2-135m-instruct")

    base, _ = loading.load_model_and_tokenizer(ModelConfig())
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    got = adapter_state(reloaded)
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)

    ours, config = load_adapter(tmp_path / "adapter")
    assert config["r"] == 4 and config["lora_alpha"] == 8
    codec = AdapterCodec.from_state_dict(state)
    assert (codec.flatten(ours) == codec.flatten(state)).all()
    # the reloaded adapter computes what the original one does, and differs from no adapter
    load_adapter_state(peft_model, state)
    peft_model.eval()
    reloaded.eval()
    ids = tok("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        out = reloaded(ids).logits
        assert torch.equal(out, peft_model(ids).logits)
        with reloaded.disable_adapter():
            assert not torch.allclose(out, reloaded(ids).logits)

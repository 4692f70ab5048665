"""The ``vllm`` engine end to end: ``ray.data.llm`` + vLLM on a GPU, the bundled SmolLM2, a LoRA.

Needs Ray, vLLM (``pip install 'ray-fedit[vllm]'`` with cluster/constraints-gpu.txt) and the
bundled SmolLM2 weights; it skips, naming what is missing, without them. The accelerator image
has neither Ray nor vLLM, so this has not run in this project yet.
"""

from __future__ import annotations

import json

import pytest

from tests.gpu.tiny_models import NO_BUNDLED_WEIGHTS, ROOT, bundled_weights_available, has_module

pytestmark = [
    pytest.mark.skipif(not has_module("ray"), reason="needs Ray (ray.data.llm)"),
    pytest.mark.skipif(not has_module("vllm"), reason="needs vLLM: pip install -c "
                       "cluster/constraints-gpu.txt '.[vllm]'"),
]

PROMPTS = [json.loads(line)["instruction"] for line in
           (ROOT / "ray_fedit/assets/seed_instructions.jsonl").read_text().splitlines()[:8]]


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "lora"])
def test_vllm_engine_answers_every_row_in_order(with_adapter, ray_gpu, tmp_path):
    if not bundled_weights_available():
        pytest.skip(NO_BUNDLED_WEIGHTS)
    import torch

    from ray_fedit.config import BUNDLED_MODEL, GenerationConfig, LoraConfig, ModelConfig
    from ray_fedit.generation import generate
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, save_adapter, wrap_lora

    model_cfg = ModelConfig(name=BUNDLED_MODEL, dtype="bfloat16")
    adapter = None
    if with_adapter:
        lora = LoraConfig(r=4)  # served with max_lora_rank 8 (vLLM has no rank 4)
        model, _ = load_model_and_tokenizer(model_cfg)
        g = torch.Generator().manual_seed(0)
        state = {k: torch.randn(v.shape, generator=g) * 0.05
                 for k, v in adapter_state(wrap_lora(model, lora)).items()}
        adapter = save_adapter(state, lora, tmp_path / "adapter", base_model=BUNDLED_MODEL)
    gen = GenerationConfig(engine="vllm", batch_size=8, num_actors=1, max_new_tokens=32)
    rows = [{"instruction": p, "n": i} for i, p in enumerate(PROMPTS)]
    out = generate(rows, prompt_field="instruction", model_cfg=model_cfg, gen_cfg=gen,
                   template="chat", adapter_dir=adapter)
    assert [r["n"] for r in out] == list(range(len(PROMPTS)))
    assert all(r["response"] and r["finish_reason"] in ("stop", "length") for r in out)
    assert all(0 < r["num_generated_tokens"] <= 32 for r in out)

"""Ray Data generation end to end on the shared local Ray: the hf engine with the tiny random model
(and a LoRA adapter), the dataset cache, and the http engine against a flaky local server."""

from __future__ import annotations

import json

import pytest
import torch

from ray_fedit.config import (
    AttackConfig,
    DataSourceConfig,
    GenerationConfig,
    HttpEngineConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
)
from ray_fedit.generation import generate, generate_dataset, pipelines
from ray_fedit.generation.hf import generate_batch, load_generator_model
from ray_fedit.generation.rows import SamplingParams, row_seed
from ray_fedit.models.lora import adapter_state, save_adapter, wrap_lora
from tests.unit.test_generation_http import ChatServer

TINY = ModelConfig(name="tiny-random-llama")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter with random (non-zero) B, so it changes the tiny model's outputs."""
    path = tmp_path_factory.mktemp("adapter")
    model, _ = load_generator_model(TINY, None, "cpu")
    lora = LoraConfig(r=4, alpha=8)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.5 for k, v in adapter_state(wrap_lora(model, lora)).items()}
    return save_adapter(state, lora, path)


def test_hf_pipeline_answers_in_order_with_the_adapter(ray_session, adapter_dir):
    """Ray Data (batches of 2, longest prompts first) gives the texts one in-process batch gives:
    the actor loaded the adapter, and row seeds make answers independent of batching."""
    prompts = ["Name a fruit.", "How do I bake bread at home?", "hi", "Write a haiku on rain."]
    rows = [{"instruction": p, "id": i} for i, p in enumerate(prompts)]
    gen = GenerationConfig(batch_size=2, max_new_tokens=5, temperature=1.0, torch_threads=1)
    out = generate(rows, prompt_field="instruction", model_cfg=TINY, gen_cfg=gen, template="chat",
                   adapter_dir=adapter_dir, seed=7)
    assert [o["id"] for o in out] == [0, 1, 2, 3] and [o["instruction"] for o in out] == prompts
    assert all(o["finish_reason"] in ("stop", "length") and o["num_generated_tokens"] >= 1
               for o in out)

    model, tok = load_generator_model(TINY, adapter_dir, "cpu")
    sp = SamplingParams(5, 1.0, 1.0)
    ref = generate_batch(model, tok, prompts, [row_seed(7, p) for p in prompts], sp, "chat")
    assert [o["response"] for o in out] == [r["generated_text"].strip() for r in ref]
    base, _ = load_generator_model(TINY, None, "cpu")
    plain = generate_batch(base, tok, prompts, [row_seed(7, p) for p in prompts], sp, "chat")
    assert [r["generated_text"] for r in plain] != [r["generated_text"] for r in ref]


def test_attack_dataset_is_cached_after_one_ray_run(ray_session, tmp_path, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(pipelines, "generate", counting)
    harm = tmp_path / "harm.jsonl"
    harm.write_text("".join(json.dumps({"instruction": f"Harmful request {w}"}) + "\n"
                            for w in ("alpha", "bravo", "charlie")))
    cfg = RunConfig.model_construct(
        model=TINY,
        # sampled: the tiny model's greedy answer is blank, which the pipeline drops
        generation=GenerationConfig(num_attack=3, max_new_tokens=4, batch_size=4, torch_threads=1,
                                    oversample=1.0, temperature=1.0),
        attack=AttackConfig(data=DataSourceConfig(kind="jsonl", path=str(harm),
                                                  response_field=None, is_harmful=True),
                            filter_refusals=False))
    first = generate_dataset("attack", cfg, out_dir=tmp_path / "cache")
    assert calls == [3] and not first.cache_hit and len(first.records) == 3
    assert first.stats["engine_calls"] == 1 and first.stats["prompts_answered"] == 3
    second = generate_dataset("attack", cfg, out_dir=tmp_path / "cache")
    assert calls == [3] and second.cache_hit and second.records == first.records


def test_http_engine_retries_and_keeps_the_key_secret(ray_session, monkeypatch):
    key = "sk-ray-test-secret"
    monkeypatch.setenv("RAY_FEDIT_TEST_KEY", key)
    with ChatServer(delay_s=0.02) as server:
        gen = GenerationConfig(engine="http", batch_size=3, http=HttpEngineConfig(
            base_url=server.url, model="canned", api_key_env="RAY_FEDIT_TEST_KEY",
            max_concurrency=2, backoff_s=0.05))
        prompts = [f"q{i} flaky" if i % 2 else f"q{i}" for i in range(6)] + ["q busy"]
        out = generate([{"p": p} for p in prompts], prompt_field="p", model_cfg=TINY, gen_cfg=gen,
                       template="chat")
    assert [o["response"] for o in out] == [f"echo: {p}" for p in prompts]
    assert all(server.attempts[p] == 2 for p in prompts if "flaky" in p or "busy" in p)
    assert server.auth == {f"Bearer {key}"} and server.peak <= 2
    assert key not in json.dumps(out)

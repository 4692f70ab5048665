"""Pure row functions of the engines (no Ray, no model), the vLLM config, and Ray-free imports."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from ray_fedit.config import GenerationConfig, ModelConfig
from ray_fedit.generation import vllm
from ray_fedit.generation.errors import GenerationError
from ray_fedit.generation.rows import (
    SamplingParams,
    chat_payload,
    from_response,
    parse_chat_response,
    row_seed,
    to_request,
    vllm_output,
    vllm_request,
)
from tests.conftest import ROOT

# Imports a module with every `ray` import failing.
BLOCK_RAY = """
import sys, importlib
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked in this test")
sys.meta_path.insert(0, _Block())
importlib.import_module(sys.argv[1])
"""
SP = SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9)


def test_sampling_params_from_config_with_overrides():
    gen = GenerationConfig(max_new_tokens=48, temperature=0.0, top_p=0.95)
    assert SamplingParams.from_config(gen) == SamplingParams(48, 0.0, 0.95)
    assert SamplingParams.from_config(gen).greedy
    assert SamplingParams.from_config(gen, temperature=1.0, max_new_tokens=8) == \
        SamplingParams(8, 1.0, 0.95)


def test_row_seed_is_sha256_of_the_parts_and_process_independent():
    """seed = first 8 bytes of sha256('[0, "x"]') as a big-endian int, mod 2**31."""
    digest = hashlib.sha256(json.dumps([0, "x"]).encode()).digest()
    assert row_seed(0, "x") == int.from_bytes(digest[:8], "big") % 2**31 == 2117516295
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", "from ray_fedit.generation.rows import row_seed;"
                          "print(row_seed(0, 'x'))"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "2117516295"
    assert row_seed(0, "x") != row_seed(1, "x") != row_seed(0, "y")


def test_to_request_derives_the_seed_from_the_prompt_or_uses_the_rows():
    row = {"instruction": "How do I bake bread?", "other": 1}
    req = to_request(row, 3, prompt_field="instruction", seed=5)
    assert req == {"_idx": 3, "prompt": "How do I bake bread?",
                   "seed": row_seed(5, "How do I bake bread?")}
    # the same prompt at another position gets the same seed: batching cannot change it
    assert to_request(row, 9, prompt_field="instruction", seed=5)["seed"] == req["seed"]
    assert to_request({**row, "seed": 42}, 3, prompt_field="instruction", seed=5)["seed"] == 42


@pytest.mark.parametrize("bad", [{"instruction": ""}, {"instruction": "  "}, {"instruction": 3}])
def test_to_request_rejects_empty_prompts(bad):
    with pytest.raises(ValueError, match="row 0: field 'instruction' must be a non-empty string"):
        to_request(bad, 0, prompt_field="instruction", seed=0)


def test_to_request_needs_the_field():
    with pytest.raises(KeyError):
        to_request({"prompt": "x"}, 0, prompt_field="instruction", seed=0)


def test_from_response_strips_and_casts():
    row = {"_idx": 2, "generated_text": "  Paris.\n", "num_generated_tokens": 4,
           "finish_reason": "stop", "extra": "ignored"}
    assert from_response(row) == {"_idx": 2, "response": "Paris.", "num_generated_tokens": 4,
                                  "finish_reason": "stop"}


def test_chat_payload_and_response_parsing():
    req = {"_idx": 0, "prompt": "Hi there", "seed": 11}
    assert chat_payload(req, SP, "my-model") == {
        "model": "my-model", "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "seed": 11}
    body = {"choices": [{"message": {"role": "assistant", "content": "Hello!"},
                         "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}
    assert parse_chat_response(body) == {"generated_text": "Hello!", "finish_reason": "stop",
                                         "num_generated_tokens": 3}
    with pytest.raises(ValueError, match="not a chat completion"):
        parse_chat_response({"error": "overloaded"})


def test_vllm_rows_chat_alpaca_and_lora():
    req = {"_idx": 4, "prompt": "Name a fruit.", "seed": 9}
    chat = vllm_request(req, SP, "chat", None)
    assert chat == {"_idx": 4, "messages": [{"role": "user", "content": "Name a fruit."}],
                    "sampling_params": {"max_tokens": 32, "temperature": 0.7, "top_p": 0.9,
                                        "seed": 9}}
    alpaca = vllm_request(req, SP, "alpaca", "/runs/x/adapter")
    assert "messages" not in alpaca and alpaca["model"] == "/runs/x/adapter"
    assert alpaca["prompt"].endswith("### Instruction:\nName a fruit.\n\n### Response:\n")
    out = {"_idx": 4, "generated_text": "Apple", "num_generated_tokens": 2, "prompt": "..."}
    assert vllm_output(out) == {"_idx": 4, "generated_text": "Apple", "num_generated_tokens": 2,
                                "finish_reason": ""}


def test_vllm_processor_config_is_valid_for_ray_data_llm(tmp_path):
    """The kwargs build Ray 2.60's vLLMEngineProcessorConfig (constructible without vLLM)."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16}))
    model = ModelConfig(name="org/some-7b", dtype="bfloat16")
    gen = GenerationConfig(engine="vllm", batch_size=32, num_actors=2)
    kwargs = vllm.processor_config_kwargs(model, gen, "alpaca", tmp_path)
    assert kwargs["engine_kwargs"] == {"dtype": "bfloat16", "enable_lora": True,
                                       "max_lora_rank": 16, "max_loras": 1}
    assert kwargs["chat_template_stage"] is False and kwargs["model_source"] == "org/some-7b"
    from ray.data.llm import vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(**kwargs)
    assert config.batch_size == 32 and config.concurrency == 2
    assert config.engine_kwargs["enable_lora"] is True


def test_vllm_cannot_serve_the_tiny_model():
    with pytest.raises(GenerationError, match="engine=hf"):
        vllm.model_source(ModelConfig(name="tiny-random-llama"))


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None,
                    reason="vLLM is installed here")
def test_vllm_engine_without_vllm_names_the_missing_piece():
    with pytest.raises(GenerationError, match=r"needs the vllm package: pip install 'ray-fedit\["):
        vllm.check_available()


@pytest.mark.parametrize("module", ["ray_fedit.generation", "ray_fedit.generation.pipelines",
                                    "ray_fedit.generation.prompts", "ray_fedit.generation.rows",
                                    "ray_fedit.judges"])
def test_generation_logic_imports_without_ray(module):
    res = subprocess.run([sys.executable, "-c", BLOCK_RAY, module], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]

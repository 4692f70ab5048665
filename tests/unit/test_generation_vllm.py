"""The ``vllm`` engine's pure functions, checked on CPU against Ray 2.60's ``ray.data.llm``.

vLLM is not installed here, and nothing in this file starts Ray or a vLLM engine. The field names
are checked against the installed Ray 2.60 itself: the processor config (``extra="forbid"``, so a
misspelled key fails), the input keys each processor stage requires, Ray's own pre/postprocess
wrappers, and the fields of the vLLM stage's output row (``vLLMOutputData``). The stage classes live
in ``ray.llm._internal``; the project's code never imports them, only these tests do, to pin the
contract of the release the project is pinned to (``ray>=2.60,<2.61``).
"""

from __future__ import annotations

import json

import pytest

from ray_fedit.config import GenerationConfig, ModelConfig
from ray_fedit.generation import vllm
from ray_fedit.generation.errors import GenerationError
from ray_fedit.generation.rows import SamplingParams, from_response, to_request

DATA = "__data"  # ray.llm's Processor.DATA_COLUMN
SP = SamplingParams(max_new_tokens=4, temperature=0.0)
MODEL = ModelConfig(name="org/some-7b", dtype="bfloat16")
GEN = GenerationConfig(engine="vllm", batch_size=16, num_actors=2)


@pytest.fixture
def adapter(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    return tmp_path


def _request(prompt: str = "Name a fruit.", idx: int = 0) -> dict:
    return to_request({"instruction": prompt}, idx, prompt_field="instruction", seed=0)


def _stages(config):
    """The processor stages Ray 2.60 builds for ``config``, in order (without starting Ray)."""
    from ray.llm._internal.batch.stages import (
        ChatTemplateStage,
        DetokenizeStage,
        TokenizeStage,
        vLLMEngineStage,
    )
    from ray.llm._internal.batch.stages.configs import (
        ChatTemplateStageConfig,
        DetokenizeStageConfig,
        TokenizerStageConfig,
        resolve_stage_config,
    )

    stages = []
    if resolve_stage_config(config.chat_template_stage, ChatTemplateStageConfig).enabled:
        stages.append(ChatTemplateStage())
    if resolve_stage_config(config.tokenize_stage, TokenizerStageConfig).enabled:
        stages.append(TokenizeStage())
    stages.append(vLLMEngineStage(fn_constructor_kwargs={"engine_kwargs": config.engine_kwargs,
                                                         "task_type": config.task_type},
                                  map_batches_kwargs={}))
    if resolve_stage_config(config.detokenize_stage, DetokenizeStageConfig).enabled:
        stages.append(DetokenizeStage())
    return stages


def test_ray_2_60_names_the_builder_build_processor():
    import ray.data.llm

    assert callable(ray.data.llm.build_processor)
    assert not hasattr(ray.data.llm, "build_llm_processor")
    assert "vLLMEngineProcessorConfig" in ray.data.llm.__all__


@pytest.mark.parametrize("rank, expected", [(1, 1), (2, 8), (4, 8), (8, 8), (9, 16), (32, 32),
                                            (33, 64), (300, 320), (512, 512)])
def test_max_lora_rank_rounds_up_to_a_rank_vllm_accepts(rank, expected):
    assert vllm.max_lora_rank(rank) == expected


def test_a_rank_above_512_is_refused():
    with pytest.raises(GenerationError, match=r"lora.r=513 .* \(512\); use generation.engine=hf"):
        vllm.max_lora_rank(513)


def test_engine_kwargs_without_and_with_an_adapter():
    assert vllm.engine_kwargs(MODEL, None) == {"dtype": "bfloat16"}
    pinned = ModelConfig(name="org/some-7b", revision="abc123")
    assert vllm.engine_kwargs(pinned, 4) == {"dtype": "float32", "revision": "abc123",
                                             "enable_lora": True, "max_lora_rank": 8,
                                             "max_loras": 1}


@pytest.mark.parametrize("template, stages", [
    ("chat", ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]),
    ("alpaca", ["TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]),
])
def test_processor_config_is_valid_and_enables_the_right_stages(template, stages, adapter):
    """extra="forbid" on the config: every key we pass is one Ray 2.60 knows."""
    from ray.data.llm import vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(**vllm.processor_config_kwargs(MODEL, GEN, template,
                                                                      adapter))
    assert config.model_source == "org/some-7b" and config.batch_size == 16
    assert config.concurrency == 2
    assert config.engine_kwargs == {"dtype": "bfloat16", "enable_lora": True, "max_lora_rank": 8,
                                    "max_loras": 1, "task_type": "generate"}
    # a failed row raises instead of coming back as an empty answer
    assert config.should_continue_on_error is False
    assert [type(s).__name__ for s in _stages(config)] == stages


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_preprocessed_rows_carry_every_key_the_first_stages_require(template, adapter):
    """Ray's wrap_preprocess puts the input row plus our columns in __data; the first stage (chat
    template: ``messages``; tokenizer: ``prompt``) and the vLLM stage (``sampling_params``) then
    validate that with their own code."""
    from ray.data.llm import vLLMEngineProcessorConfig
    from ray.llm._internal.batch.stages.base import StatefulStageUDF, wrap_preprocess

    config = vLLMEngineProcessorConfig(**vllm.processor_config_kwargs(MODEL, GEN, template,
                                                                      adapter))
    row = wrap_preprocess(vllm.preprocess(SP, template, adapter), DATA)(_request())[DATA]
    stages = _stages(config)
    first, engine = stages[0], stages[-2]
    StatefulStageUDF(DATA, list(first.get_required_input_keys())).validate_inputs([row])
    assert set(engine.get_required_input_keys()) == {"sampling_params"} <= set(row)
    if template == "alpaca":
        assert row["prompt"].endswith("### Instruction:\nName a fruit.\n\n### Response:\n")
        assert "messages" not in row
    else:
        assert row["messages"] == [{"role": "user", "content": "Name a fruit."}]
    # a `model` different from the engine's model is a LoRA request, loaded from this path
    assert "model" in engine.get_optional_input_keys()
    assert row["model"] == str(adapter.resolve()) != config.model_source


def test_sampling_params_use_vllm_field_names_and_plain_values():
    """``vllm.SamplingParams(**row["sampling_params"])``: max_tokens, temperature, top_p and seed
    are its documented fields; plain Python numbers, so Arrow stores them as a struct."""
    row = vllm.preprocess(SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9), "chat",
                          None)(_request())
    assert row["sampling_params"] == {"max_tokens": 7, "temperature": 0.7, "top_p": 0.9,
                                      "seed": _request()["seed"]}
    assert all(type(v) in (int, float) for v in row["sampling_params"].values())
    assert "model" not in row  # no adapter: the base model answers


def _engine_row(request: dict, text: str, tokens: list[int]) -> dict:
    """__data after the vLLM and detokenize stages: the preprocessed row plus vLLMOutputData."""
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMOutputData

    out = vLLMOutputData(prompt="<rendered>", prompt_token_ids=[1, 2, 3], num_input_tokens=3,
                         generated_tokens=tokens, generated_text=text,
                         num_generated_tokens=len(tokens))
    return {**request, **out.model_dump(), "request_id": 0, "time_taken_llm": 0.1}


@pytest.mark.parametrize("tokens, reason", [([5, 6, 2], "stop"), ([5, 6, 7, 8], "length")])
def test_postprocess_reads_the_vllm_output_row(tokens, reason):
    """max_tokens 4: three tokens (the last one EOS) stopped early; four used the whole budget."""
    from ray.llm._internal.batch.stages.base import wrap_postprocess

    engine_row = _engine_row(_request(idx=3), " Apple", tokens)
    out = wrap_postprocess(vllm.postprocess(SP), DATA)({DATA: engine_row})
    assert out == {"_idx": 3, "generated_text": " Apple", "num_generated_tokens": len(tokens),
                   "finish_reason": reason}
    assert from_response(out) == {"_idx": 3, "response": "Apple",
                                  "num_generated_tokens": len(tokens), "finish_reason": reason}


def test_finish_reason_from_the_token_count():
    assert vllm.finish_reason(3, 4) == "stop"
    assert vllm.finish_reason(4, 4) == "length"


class _FakeProcessor:
    """Stands in for ``build_processor(...)`` with the chat template: runs our pre/postprocess
    through Ray's own wrappers around a fake engine that answers ``SAFE:<user turn>`` in two
    tokens plus EOS."""

    def __init__(self, config, *, preprocess, postprocess):
        from ray.llm._internal.batch.stages.base import wrap_postprocess, wrap_preprocess

        self.config = config
        self.pre, self.post = wrap_preprocess(preprocess, DATA), wrap_postprocess(postprocess, DATA)

    def __call__(self, rows):
        out = []
        for row in rows:
            data = self.pre(dict(row))[DATA]
            data.update(_engine_row({}, "SAFE:" + data["messages"][-1]["content"], [7, 8, 2]))
            out.append(self.post({DATA: data}))
        return _Rows(out)


class _Rows(list):
    def take_all(self):
        return list(reversed(self))  # Ray Data does not keep the order: _idx must restore it


def test_generate_with_the_vllm_engine_end_to_end_with_a_fake_processor(monkeypatch, adapter):
    import ray.data
    import ray.data.llm

    from ray_fedit.generation import generate

    built = {}

    def fake_build(config, **kwargs):
        built["config"] = config
        return _FakeProcessor(config, **kwargs)

    monkeypatch.setattr(vllm, "check_available", lambda: None)
    monkeypatch.setattr(ray.data.llm, "build_processor", fake_build)
    monkeypatch.setattr(ray.data, "from_items", list)
    rows = [{"instruction": "Name a fruit.", "id": 1}, {"instruction": "Name a tree.", "id": 2}]
    out = generate(rows, prompt_field="instruction", model_cfg=MODEL, gen_cfg=GEN,
                   template="chat", adapter_dir=adapter, sampling=SP)
    assert out == [
        {"instruction": "Name a fruit.", "id": 1, "response": "SAFE:Name a fruit.",
         "num_generated_tokens": 3, "finish_reason": "stop"},
        {"instruction": "Name a tree.", "id": 2, "response": "SAFE:Name a tree.",
         "num_generated_tokens": 3, "finish_reason": "stop"},
    ]
    assert built["config"].engine_kwargs["max_lora_rank"] == 8
    assert built["config"].chat_template_stage is True

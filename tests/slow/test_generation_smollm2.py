"""Attack and defense data end to end with the real bundled SmolLM2 (a handful of rows).

The model runs in this process through the hf engine's core (:func:`generate_batch`), loaded once;
the Ray Data path around it is covered by tests/ray/test_generation.py with the tiny model. This
keeps the test under a minute on 2 cores.
"""

from __future__ import annotations

import pytest
import torch

from ray_fedit.config import (
    AttackConfig,
    DataSourceConfig,
    DefenseConfig,
    GenerationConfig,
    ModelConfig,
    RunConfig,
)
from ray_fedit.generation import pipelines
from ray_fedit.generation.hf import generate_batch, load_generator_model
from ray_fedit.generation.rows import SamplingParams, from_response, to_request
from ray_fedit.judges.rule import is_refusal

SMOLLM2 = ModelConfig()


@pytest.fixture(scope="module")
def smollm2():
    # One thread: on a shared 2-core machine two OpenMP threads stall each other badly when
    # other processes run (measured 5x slower per step); alone, two are only a bit faster.
    torch.set_num_threads(1)
    return load_generator_model(SMOLLM2, None, "cpu")


@pytest.fixture
def local_engine(smollm2, monkeypatch):
    """``generate`` with the same row functions and batching, without Ray."""
    model, tok = smollm2

    def engine(rows, *, prompt_field, model_cfg, gen_cfg, template, adapter_dir=None, seed=0,
               sampling=None, progress=None):
        assert model_cfg.name == SMOLLM2.name and adapter_dir is None
        sampling = sampling or SamplingParams.from_config(gen_cfg)
        reqs = [to_request(r, i, prompt_field=prompt_field, seed=seed) for i, r in enumerate(rows)]
        out = []
        for start in range(0, len(reqs), gen_cfg.batch_size):
            batch = reqs[start:start + gen_cfg.batch_size]
            res = generate_batch(model, tok, [r["prompt"] for r in batch],
                                 [r["seed"] for r in batch], sampling, template)
            out += [from_response({**q, **r}) for q, r in zip(batch, res, strict=True)]
        return [{**row, **{k: v for k, v in o.items() if k != "_idx"}}
                for row, o in zip(rows, out, strict=True)]

    monkeypatch.setattr(pipelines, "generate", engine)


def _cfg(**sections):
    gen = GenerationConfig(max_new_tokens=24, batch_size=8, num_attack=3,
                           harmful_sources=[DataSourceConfig(kind="package", path="harmbench",
                                                             is_harmful=True, limit=4)],
                           defense_instructions="sources")
    return RunConfig.model_construct(model=SMOLLM2, generation=gen, **sections)


def test_attack_rows_from_smollm2(local_engine, tmp_path):
    cfg = _cfg(attack=AttackConfig(data=DataSourceConfig(kind="package", path="harmbench",
                                                         is_harmful=True, limit=8)))
    data = pipelines.generate_dataset("attack", cfg, out_dir=tmp_path)
    answers = data.stats["answers"]
    assert 1 <= len(data.records) <= 3 and answers["answered"] >= 3
    for r in data.records:
        assert r["is_harmful"] and r["source"] == "harmbench" and len(r["response"]) > 20
        assert not is_refusal(r["response"], word_boundary=True)  # filtered (word mode)
    assert data.provenance["generator"] == "smollm2-135m-instruct"


def test_defense_rows_from_smollm2(local_engine, tmp_path):
    cfg = _cfg(defense=DefenseConfig(level=2, num_samples=2, aligned_ratio=0.5))
    data = pipelines.generate_dataset("defense", cfg, out_dir=tmp_path)
    aligned = [r for r in data.records if r["meta"]["part"] == "aligned"]
    normal = [r for r in data.records if r["meta"]["part"] == "normal"]
    assert len(normal) == 1 and len(normal[0]["response"]) > 20
    # SmolLM2 refuses rarely even with the reminder: whatever it kept must be refusals.
    assert len(aligned) == data.stats["aligned"]["rows"] <= 1
    assert all(is_refusal(r["response"], word_boundary=True) for r in aligned)
    share = data.stats["aligned"]["answers"]["kept_share"]
    assert share is not None and 0.0 <= share <= 1.0

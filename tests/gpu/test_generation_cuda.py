"""The ``hf`` generation engine's core (:func:`ray_fedit.generation.hf.generate_batch`) on CUDA.

- Greedy decoding of a left-padded batch gives, token for token, what each prompt gives alone. This
  is asserted in fp32 with IEEE matmuls; in bf16 the padded matmuls round differently, so the share
  of identical rows is only recorded.
- Throughput at batch 1 and batch 32 is printed (and recorded for tests/gpu/device_check.sh).

The tiny random Llama runs everywhere the bundled tokenizer is; the real SmolLM2 runs where its
weights are (the accelerator image does not carry them).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ray_fedit.config import BUNDLED_MODEL, TINY_MODEL
from tests.gpu.tiny_models import (
    NO_BUNDLED_WEIGHTS,
    ROOT,
    Timer,
    bundled_weights_available,
    record,
)

pytestmark = pytest.mark.usefixtures("needs_bundled_tokenizer")

SEED_FILE = ROOT / "ray_fedit/assets/seed_instructions.jsonl"
PROMPTS = [json.loads(line)["instruction"] for line in SEED_FILE.read_text().splitlines()[:32]]

MODELS = [pytest.param(TINY_MODEL, id="tiny"), pytest.param(BUNDLED_MODEL, id="smollm2")]


class _Recorder:
    """A model proxy that keeps the token ids ``generate`` returns (everything else forwards)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.outputs: list[list[int]] = []

    def generate(self, **kwargs: Any) -> Any:
        out = self._model.generate(**kwargs)
        width = kwargs["input_ids"].shape[1]
        self.outputs.extend(out[:, width:].tolist())
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _load(name: str, dtype: str, device):
    from ray_fedit.config import ModelConfig
    from ray_fedit.generation.hf import load_generator_model

    if name == BUNDLED_MODEL and not bundled_weights_available():
        pytest.skip(NO_BUNDLED_WEIGHTS)

    return load_generator_model(ModelConfig(name=name, dtype=dtype), None, str(device))


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    end = next((i for i, t in enumerate(tokens) if t in eos), None)
    return tokens if end is None else tokens[:end + 1]


def _batched_and_single(name: str, dtype: str, device, n: int = 8, max_new_tokens: int = 24):
    from ray_fedit.generation.hf import eos_token_ids, generate_batch
    from ray_fedit.generation.rows import SamplingParams

    model, tok = _load(name, dtype, device)
    eos = set(eos_token_ids(model, tok))
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    prompts = sorted(PROMPTS[:n], key=len)  # lengths differ: the batch is left-padded
    batch = _Recorder(model)
    batched = generate_batch(batch, tok, prompts, [0] * n, sp, "chat")
    single = _Recorder(model)
    singles = [generate_batch(single, tok, [p], [0], sp, "chat")[0] for p in prompts]
    assert model.device.type == device.type
    return ([_until_eos(t, eos) for t in batch.outputs],
            [_until_eos(t, eos) for t in single.outputs], batched, singles)


@pytest.mark.parametrize("name", MODELS)
def test_batched_greedy_equals_unbatched_token_for_token_in_fp32(name, device, strict_fp32):
    batch_tokens, single_tokens, batched, singles = _batched_and_single(name, "float32", device)
    assert batch_tokens == single_tokens
    assert batched == singles  # text, token count and finish reason


@pytest.mark.parametrize("name", MODELS)
def test_bf16_batched_greedy_agreement_is_recorded(name, device):
    batch_tokens, single_tokens, _, _ = _batched_and_single(name, "bfloat16", device)
    same = sum(a == b for a, b in zip(batch_tokens, single_tokens, strict=True))
    first = sum(a[:1] == b[:1] for a, b in zip(batch_tokens, single_tokens, strict=True))
    record("bf16_batch_agreement", model=name, rows=len(batch_tokens), identical_rows=same,
           same_first_token=first)
    assert all(len(t) > 0 for t in batch_tokens)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", MODELS)
def test_tokens_per_second_at_batch_1_and_32(name, dtype, device):
    """Greedy, up to 64 new tokens, stopping at EOS: 8 prompts one by one, then 32 in one batch."""
    from ray_fedit.generation.hf import generate_batch
    from ray_fedit.generation.rows import SamplingParams

    model, tok = _load(name, dtype, device)
    sp = SamplingParams(max_new_tokens=64)
    generate_batch(model, tok, PROMPTS[:2], [0, 0], sp, "chat")  # warm-up: kernels, allocator
    rates = {}
    for batch_size, prompts in ((1, PROMPTS[:8]), (32, PROMPTS[:32])):
        tokens = 0
        with Timer() as t:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                out = generate_batch(model, tok, chunk, [0] * len(chunk), sp, "chat")
                tokens += sum(o["num_generated_tokens"] for o in out)
        rates[batch_size] = tokens / t.seconds
        record("tokens_per_s", model=name, dtype=dtype, device=str(device), batch=batch_size,
               prompts=len(prompts), tokens=tokens, seconds=round(t.seconds, 3),
               tokens_per_s=round(rates[batch_size], 1))
    assert rates[32] > rates[1]

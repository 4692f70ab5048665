"""The resident generator's pure parts, without Ray: the batches Ray Data forms, and an adapter
merged for one call that leaves the base weights exactly as loaded."""

from __future__ import annotations

import torch

from ray_fedit.config import LoraConfig, ModelConfig
from ray_fedit.generation.hf import adapter_merged, generate_batch, load_generator_model
from ray_fedit.generation.resident import from_items_block_sizes, ray_data_batches
from ray_fedit.generation.rows import SamplingParams
from ray_fedit.models.lora import adapter_state, save_adapter, wrap_lora

TINY = ModelConfig(name="tiny-random-llama")
PROMPTS = ["How do I bake bread?", "Name a fruit.", "Write a haiku about rain, please.", "hi"]


def spans(batches: list[range]) -> list[tuple[int, int]]:
    return [(b.start, b.stop) for b in batches]


def test_one_row_per_block_gives_consecutive_full_batches():
    """5 rows, 200 blocks -> 5 one-row blocks; bundles of 2 rows -> [0,2) [2,4) [4,5)."""
    assert from_items_block_sizes(5, 200) == [1, 1, 1, 1, 1]
    assert spans(ray_data_batches(5, 2, 200)) == [(0, 2), (2, 4), (4, 5)]


def test_multi_row_blocks_overshoot_their_bundles():
    """7 rows in 3 blocks -> [3, 2, 2]; bundles reach >= 3 rows: [3] then [2+2=4], each cut
    into batches of 3 -> [0,3) | [3,6) [6,7)."""
    assert from_items_block_sizes(7, 3) == [3, 2, 2]
    assert spans(ray_data_batches(7, 3, 3)) == [(0, 3), (3, 6), (6, 7)]


def test_250_rows_in_200_blocks():
    """250 = 200 blocks: 50 of 2 rows, then 150 of 1. Batch 16: 8 two-row blocks make the first
    bundles (16 rows each), ... every row is in exactly one batch, in order."""
    batches = ray_data_batches(250, 16, 200)
    assert [i for b in batches for i in b] == list(range(250))
    assert all(len(b) <= 16 for b in batches)
    assert spans(batches[:3]) == [(0, 16), (16, 32), (32, 48)]


def test_an_adapter_merged_for_one_call_leaves_the_base_bitwise(tmp_path):
    torch.set_num_threads(1)
    model, tok = load_generator_model(TINY, None, "cpu")
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoraConfig(r=4, alpha=8)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.5
             for k, v in adapter_state(wrap_lora(load_generator_model(TINY, None, "cpu")[0],
                                                 lora)).items()}
    save_adapter(state, lora, tmp_path)
    fresh, _ = load_generator_model(TINY, tmp_path, "cpu")  # today's path: load, then merge
    params, seeds = SamplingParams(6, 1.0, 1.0), [1, 2, 3, 4]

    for _ in range(2):  # the second merge starts from the restored base
        with adapter_merged(model, tmp_path) as merged:
            assert all(torch.equal(merged.state_dict()[k], v)
                       for k, v in fresh.state_dict().items())
            answers = generate_batch(merged, tok, PROMPTS, seeds, params, "chat")
        after = model.state_dict()
        assert after.keys() == pristine.keys()
        assert all(torch.equal(after[k], v) for k, v in pristine.items())
    assert answers == generate_batch(fresh, tok, PROMPTS, seeds, params, "chat")
    with adapter_merged(model, None) as same:
        assert same is model

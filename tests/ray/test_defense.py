"""The post-hoc defense as a Ray Train job on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from ray_fedit.data.schema import make_record
from ray_fedit.models.codec import AdapterCodec
from ray_fedit.models.lora import load_adapter, save_adapter
from ray_fedit.registry import DEFENSES

RECORDS = [make_record(f"How do I do thing {i}?", "I cannot help with that.", source="aligned",
                       is_harmful=True) for i in range(6)] + \
          [make_record(f"What is {i} plus {i}?", f"It is {2 * i}.", source="normal") for i in range(6)]


def _cfg(tiny_config, **defense):
    d = {"steps": 6, "steps_per_round": 3, "batch_size": 2, "lr": 5e-3, "lr_min": 1e-3,
         "checkpoint_every": 3, **defense}
    return tiny_config.model_copy(update={"defense": tiny_config.defense.model_copy(update=d)})


def _start_adapter(cfg, path):
    """A non-zero adapter standing in for the attacked global adapter."""
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, wrap_lora

    model, _ = load_model_and_tokenizer(cfg.model)
    state = adapter_state(wrap_lora(model, cfg.lora))
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state.items()}
    save_adapter(state, cfg.lora, path)
    return state


def test_posthoc_trains_from_the_global_adapter_and_checkpoints(ray_session, tiny_config, tmp_path):
    cfg = _cfg(tiny_config)
    start = _start_adapter(cfg, tmp_path / "global")
    result = DEFENSES.get("posthoc")(cfg, RECORDS, global_adapter=tmp_path / "global",
                                     out_dir=tmp_path / "defense")
    assert sorted(result.checkpoints) == [3, 6]
    assert result.adapter_dir == tmp_path / "defense" / "step_0006"
    assert len(result.losses) == 6 and result.losses[-1] < result.losses[0]
    codec = AdapterCodec.from_state_dict(start)
    first, _ = load_adapter(result.checkpoints[3])
    final, _ = load_adapter(result.adapter_dir)
    v0, v3, v6 = codec.flatten(start), codec.flatten(first), codec.flatten(final)
    assert (v3 != v0).any() and (v6 != v3).any()
    # training from the attacked adapter: a small step away from it, not a fresh adapter
    assert abs(v6 - v0).max() < abs(v0).max()
    # the progress the caller showed: one line per round, with that round's mean loss
    progress = [json.loads(line) for line in
                (tmp_path / "defense" / "defense_progress.jsonl").read_text().splitlines()]
    assert [(p["step"], p["round"]) for p in progress] == [(3, 0), (6, 1)]
    assert [p["loss"] for p in progress] == pytest.approx(
        [sum(result.losses[:3]) / 3, sum(result.losses[3:]) / 3], rel=1e-12)


def test_pretrained_variant_starts_from_a_fresh_adapter(ray_session, tiny_config, tmp_path):
    cfg = _cfg(tiny_config, steps=3, checkpoint_every=3)
    result = DEFENSES.get("pretrained")(cfg, RECORDS, global_adapter=None, out_dir=tmp_path / "d")
    state, config = load_adapter(result.adapter_dir)
    # LoRA B starts at zero; after 3 steps it has moved but stays small
    b = torch.cat([v.flatten() for k, v in state.items() if "lora_B" in k])
    assert 0 < b.abs().max() < 0.1 and config["r"] == cfg.lora.r


# ------------------------------------------------------------ two workers vs one process, same batch
# Rank r trains on RECORDS_2W[r::2] (two examples each), one example per step. Rank 1's first
# example is all prompt (truncated at max_seq_len=64: no target token), so in one step of every
# round rank 1 has nothing to learn; the other examples have 6, 3 (rank 0) and 13 target tokens.
ALL_PROMPT = make_record("Tell me " + "a very long story " * 20, "No.", source="normal")
RECORDS_2W = [make_record("What is 2 plus 2?", "It is 4.", source="normal"),  # rank 0, 6 tokens
              ALL_PROMPT,                                                     # rank 1, 0 tokens
              make_record("Is the sky blue?", "Yes.", source="normal"),           # rank 0, 3 tokens
              make_record("Say hi.", "Hello there, my friend, how are you doing today?",
                          source="normal")]                                   # rank 1, 13 tokens
# DDP and DeepSpeed sum float32 gradients in another order than one process on one padded batch;
# Adam's g / sqrt(v) magnifies that noise on coordinates with tiny gradients. Measured: at most
# 3.6e-6 (lr 1e-2, 4 steps), while per-rank means or an optimizer kept across rounds move
# thousands of coordinates by more than 1e-3.
UPDATE_ATOL = 1e-4


def _reference(cfg, start, steps_examples):
    """The paper's defense in one process on the union batch of every step: a fresh AdamW each round,
    lr constant within a round (cosine across rounds), loss = summed token CE / token count, and
    the gradient clipped to max_grad_norm. Returns the adapter and the per-step losses."""
    from ray_fedit.defenses.posthoc import round_plan
    from ray_fedit.federation.sft import collate, cosine_learning_rate, response_loss, tokenize_records
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, load_adapter_state, wrap_lora

    d = cfg.defense
    model, tok = load_model_and_tokenizer(cfg.model)
    peft_model = wrap_lora(model, cfg.lora)
    load_adapter_state(peft_model, start)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    peft_model.train()
    plan, step, losses = round_plan(d.steps, d.steps_per_round), 0, []
    for rnd, k in enumerate(plan):
        opt = torch.optim.AdamW(params, lr=cosine_learning_rate(rnd, len(plan), d.lr, d.lr_min),
                                weight_decay=0.0)
        for _ in range(k):
            examples = tokenize_records(tok, steps_examples[step], template=cfg.data.template,
                                        max_seq_len=cfg.data.max_seq_len)
            b = collate(examples, tok.pad_token_id)
            summed, n = response_loss(peft_model(input_ids=b["input_ids"],
                                                 attention_mask=b["attention_mask"]).logits, b["labels"])
            opt.zero_grad()
            (summed / n).backward()
            torch.nn.utils.clip_grad_norm_(params, d.max_grad_norm)
            opt.step()
            losses.append(float(summed) / n)
            step += 1
    return adapter_state(peft_model), losses


def _union_batches(cfg, records, world):
    """Which records each step of the recipe trains on, over all ranks (the recipe's own order)."""
    from ray_fedit.defenses.posthoc import round_plan, worker_order

    d = cfg.defense
    per_worker = d.batch_size // world
    out = []
    for rnd, k in enumerate(round_plan(d.steps, d.steps_per_round)):
        orders = [worker_order(cfg.seed, rnd, rank, len(records[rank::world]), k, per_worker)
                  for rank in range(world)]
        out += [[records[rank::world][int(i)] for rank in range(world) for i in orders[rank][s]]
                for s in range(k)]
    return out


@pytest.mark.parametrize("zero_stage", [None, 3], ids=["ddp", "zero3"])
def test_two_workers_match_one_process_on_the_union_batch(ray_session, tiny_config, tmp_path,
                                                          monkeypatch, zero_stage):
    """Covers: every rank runs backward every step (DDP / ZeRO all-reduce), the loss is the global
    token mean, AdamW restarts each round, and under ZeRO-3 the saved adapter is gathered (full
    shapes, loadable by PEFT). 4 steps in 2 rounds of 2, one example per rank per step."""
    import peft

    from ray_fedit.defenses import posthoc as posthoc_module
    from ray_fedit.models.loading import load_model_and_tokenizer

    # a rank stuck in a collective fails the job in 120 s instead of torch's 30 min
    monkeypatch.setattr(posthoc_module, "PROCESS_GROUP_TIMEOUT_S", 120)
    cfg = _cfg(tiny_config, steps=4, steps_per_round=2, checkpoint_every=2, batch_size=2,
               num_workers=2, lr=1e-2, lr_min=1e-3)
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"dropout": 0.0})})
    if zero_stage is not None:
        ds = tmp_path / "zero.json"
        # ZeRO-3 keeps tensors under stage3_param_persistence_threshold (1e5 elements) whole on
        # every rank; the tiny LoRA matrices are, so 0 partitions them as a 7B model's would be.
        ds.write_text(json.dumps({
            "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "weight_decay": 0.0, "torch_adam": True}},
            "bf16": {"enabled": False}}))
        cfg = cfg.model_copy(update={"defense": cfg.defense.model_copy(update={"deepspeed": str(ds)})})
    start = _start_adapter(cfg, tmp_path / "global")
    steps_examples = _union_batches(cfg, RECORDS_2W, world=2)
    assert any(ALL_PROMPT in batch for batch in steps_examples)

    result = DEFENSES.get("posthoc")(cfg, RECORDS_2W, global_adapter=tmp_path / "global",
                                     out_dir=tmp_path / "defense")
    want, want_losses = _reference(cfg, start, steps_examples)

    got, adapter_config = load_adapter(result.adapter_dir)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    codec = AdapterCodec.from_state_dict(start)
    v0 = codec.flatten(start)
    update, want_update = codec.flatten(got) - v0, codec.flatten(want) - v0
    assert abs(want_update).max() > 100 * UPDATE_ATOL  # the comparison below has something to see
    assert abs(update - want_update).max() < UPDATE_ATOL
    assert result.losses == pytest.approx(want_losses, rel=1e-5)
    # the saved directory is a PEFT adapter for the base model
    base, _ = load_model_and_tokenizer(cfg.model)
    loaded = peft.PeftModel.from_pretrained(base, str(result.adapter_dir))
    assert adapter_config["r"] == cfg.lora.r and loaded.peft_config["default"].r == cfg.lora.r

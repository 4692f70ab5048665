"""The post-hoc defense as a Ray Train job on the tiny model."""

from __future__ import annotations

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


def test_pretrained_variant_starts_from_a_fresh_adapter(ray_session, tiny_config, tmp_path):
    cfg = _cfg(tiny_config, steps=3, checkpoint_every=3)
    result = DEFENSES.get("pretrained")(cfg, RECORDS, global_adapter=None, out_dir=tmp_path / "d")
    state, config = load_adapter(result.adapter_dir)
    # LoRA B starts at zero; after 3 steps it has moved but stays small
    b = torch.cat([v.flatten() for k, v in state.items() if "lora_B" in k])
    assert 0 < b.abs().max() < 0.1 and config["r"] == cfg.lora.r

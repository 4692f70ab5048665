"""The post-hoc defense's training loop with DeepSpeed ZeRO-2 and ZeRO-3 on one GPU.

Runs the registered ``posthoc`` defense (a Ray Train job, ``defense.use_gpu=true``, one worker) with
the shipped configs ``configs/deepspeed/zero2_offload.json`` (ZeRO-2, optimizer state offloaded to
CPU) and ``configs/deepspeed/zero3.json`` (ZeRO-3, bf16). Every saved adapter must hold the full
LoRA shapes (ZeRO-3 partitions parameters: an adapter saved without gathering them first holds
empty tensors) and load with ``peft.PeftModel.from_pretrained``.

ZeRO-3 keeps tensors below ``stage3_param_persistence_threshold`` (default 1e5 elements) whole on
every rank, and the tiny model's LoRA tensors (8 x 64) are far below it, while a 7B model's
(32 x 4096) are above. The ZeRO-3 case therefore sets the threshold to 0, so that the adapter is
partitioned as it is at scale; with the shipped value this test could not see a missing gather.

Needs Ray and DeepSpeed besides CUDA; it skips, naming what is missing, without them (the
accelerator image has neither).
"""

from __future__ import annotations

import json

import pytest

from tests.gpu.tiny_models import ROOT, has_module

pytestmark = [
    pytest.mark.usefixtures("needs_bundled_tokenizer"),
    pytest.mark.skipif(not has_module("ray"), reason="the defense is a Ray Train job: needs Ray "
                       "(pip install 'ray[default,train,data]==2.60.0')"),
]

STEPS, EVERY = 4, 2


def _records():
    from ray_fedit.data.schema import make_record

    aligned = [make_record(f"How do I do harmful thing {i}?", "I cannot help with that.",
                           source="aligned", is_harmful=True) for i in range(4)]
    normal = [make_record(f"What is {i} plus {i}?", f"It is {2 * i}.", source="normal")
              for i in range(4)]
    return aligned + normal


def _expected_state(cfg):
    """The adapter's keys and full shapes, from a freshly wrapped model."""
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, wrap_lora

    model, _ = load_model_and_tokenizer(cfg.model)
    return adapter_state(wrap_lora(model, cfg.lora))


def _deepspeed_config(name: str, tmp_path) -> str:
    """The shipped config, with ZeRO-3's persistence threshold at 0 (see the module docstring)."""
    config = json.loads((ROOT / "configs/deepspeed" / name).read_text())
    if config["zero_optimization"]["stage"] != 3:
        return str(ROOT / "configs/deepspeed" / name)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("ds_config", ["zero2_offload.json", "zero3.json"])
def test_posthoc_defense_with_zero_saves_full_adapters_that_peft_loads(
        ds_config, device, ray_gpu, tiny_run_config, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not importable: "
                        "pip install deepspeed==0.19.8 to run the ZeRO tests")
    import torch
    from peft import PeftModel, get_peft_model_state_dict

    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import load_adapter, save_adapter
    from ray_fedit.registry import DEFENSES

    cfg = tiny_run_config.model_copy(update={"defense": tiny_run_config.defense.model_copy(update={
        "steps": STEPS, "steps_per_round": EVERY, "checkpoint_every": EVERY, "batch_size": 2,
        "lr": 5e-3, "lr_min": 1e-3, "num_workers": 1, "use_gpu": device.type == "cuda",
        "deepspeed": _deepspeed_config(ds_config, tmp_path)})})
    expected = _expected_state(cfg)
    g = torch.Generator().manual_seed(1)
    start = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in expected.items()}
    save_adapter(start, cfg.lora, tmp_path / "global")

    result = DEFENSES.get("posthoc")(cfg, _records(), global_adapter=tmp_path / "global",
                                     out_dir=tmp_path / "defense")

    assert sorted(result.checkpoints) == [EVERY, STEPS]
    assert len(result.losses) == STEPS and all(torch.isfinite(torch.tensor(result.losses)))
    for step, path in result.checkpoints.items():
        state, _ = load_adapter(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        assert shapes == {k: tuple(v.shape) for k, v in expected.items()}, f"step {step}"
        assert all(torch.isfinite(v.float()).all() for v in state.values())
    final, _ = load_adapter(result.adapter_dir)
    assert any(not torch.equal(final[k].float(), start[k]) for k in start)  # it trained

    base, _ = load_model_and_tokenizer(cfg.model)
    loaded = PeftModel.from_pretrained(base, str(result.adapter_dir))
    for k, v in get_peft_model_state_dict(loaded).items():
        assert torch.equal(v.to(final[k].dtype), final[k]), k

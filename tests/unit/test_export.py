"""``ray-fedit export``: the PEFT adapter as it is, or a merged standalone transformers model."""

from __future__ import annotations

import json

import pytest
import torch

from ray_fedit.config import load_config
from ray_fedit.errors import ConfigError
from ray_fedit.export import export_adapter, stage_adapter


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory whose federate stage left a non-trivial tiny-model adapter."""
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, save_adapter, wrap_lora

    root = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["model.name=tiny-random-llama", "defense.name=none"])
    (root / "resolved_config.yaml").write_text(cfg.to_yaml())
    base, _ = load_model_and_tokenizer(cfg.model)
    model = wrap_lora(base, cfg.lora)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in adapter_state(model).items()}
    adapter = save_adapter(state, cfg.lora, root / "checkpoints" / "final", cfg.model.name)
    (root / "stages").mkdir()
    (root / "stages" / "federate.json").write_text(json.dumps(
        {"outputs": {"adapters": {"attacked": str(adapter)}}}))
    return root


def test_the_merged_model_gives_the_base_plus_adapter_logits(run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_fedit.models.loading import load_model_and_tokenizer

    dest = export_adapter(run_dir, tmp_path / "merged", stage="attacked", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(dest).eval()
    tok = AutoTokenizer.from_pretrained(dest)
    assert tok.chat_template and (dest / "model.safetensors").is_file()
    model_cfg = load_config(run_dir / "resolved_config.yaml").model
    plain, _ = load_model_and_tokenizer(model_cfg)
    base, _ = load_model_and_tokenizer(model_cfg)
    reference = PeftModel.from_pretrained(base, str(stage_adapter(run_dir, "attacked"))).eval()
    ids = tok("Name three primary colours.", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, merged(input_ids=ids).logits
        without = plain(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(without, want, atol=1e-3)  # the adapter does change the model


def test_the_adapter_export_copies_the_peft_files(run_dir, tmp_path):
    dest = export_adapter(run_dir, tmp_path / "adapter", stage="attacked")
    src = stage_adapter(run_dir, "attacked")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (dest / name).read_bytes() == (src / name).read_bytes()


def test_export_errors_name_the_problem(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="no finished 'defend' stage"):
        export_adapter(run_dir, tmp_path / "x", stage="defended")
    with pytest.raises(ConfigError, match="no no_attack adapter"):
        export_adapter(run_dir, tmp_path / "x", stage="no_attack")
    with pytest.raises(ConfigError, match="must be one of"):
        export_adapter(run_dir, tmp_path / "x", stage="final")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        export_adapter(run_dir, tmp_path / "full", stage="attacked")


def test_the_cli_exports_and_exits_2_on_a_bad_stage(run_dir, tmp_path, capsys):
    from ray_fedit.cli import main

    assert main(["export", str(run_dir), str(tmp_path / "a"), "--stage", "attacked"]) == 0
    assert "adapter (attacked) written to" in capsys.readouterr().out
    assert main(["export", str(run_dir), str(tmp_path / "b")]) == 2  # no defended adapter
    assert "no finished 'defend' stage" in capsys.readouterr().err

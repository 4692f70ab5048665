"""Checkpoints: atomic save, exact round trip, and refusal of corrupted or mismatched ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ray_fedit.config import LoraConfig
from ray_fedit.errors import CheckpointError
from ray_fedit.federation import checkpoint as ckpt
from ray_fedit.federation.rule_state import RuleState
from ray_fedit.federation.server_opt import ServerOptState
from ray_fedit.federation.state import FederationState
from ray_fedit.models.codec import AdapterCodec

LORA = LoraConfig(r=2, alpha=4, target_modules=["q_proj"])


@pytest.fixture(scope="module")
def adapter_config():
    return ckpt.render_adapter_config(LORA, "tiny-random-llama")


@pytest.fixture
def codec():
    return AdapterCodec.from_state_dict({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4, 2),
    })


def _state(codec, rounds_done=2):
    rng = np.random.default_rng(0)
    return FederationState(
        rounds_done=rounds_done,
        global_vector=rng.standard_normal(codec.dim).astype(np.float32),
        server=ServerOptState(arrays={"m": np.full(codec.dim, 0.5, np.float32),
                                      "v": np.full(codec.dim, 0.25, np.float32)}, steps=2),
        control=np.arange(codec.dim, dtype=np.float32),
        client_state={3: {"round": 1, "sha256": "ab"}},
        metrics=[{"round": 1, "mean_loss": 2.5}, {"round": 2, "mean_loss": None}],
        rule=RuleState(center=rng.standard_normal(codec.dim).astype(np.float32),
                       history={4: rng.standard_normal(codec.dim).astype(np.float32)}),
    )


@pytest.fixture
def save(adapter_config):
    def _save(tmp_path, codec, state, config_hash="cfg1"):
        return ckpt.save_checkpoint(tmp_path, state, config_hash=config_hash, codec=codec,
                                    adapter_config=adapter_config, seed=0)
    return _save


def test_write_adapter_matches_peft_save(tmp_path, codec, adapter_config):
    """The driver's peft-free writer produces byte-identical files to models.lora.save_adapter."""
    from ray_fedit.models.lora import save_adapter

    vector = np.arange(codec.dim, dtype=np.float32)
    ckpt.write_adapter(tmp_path / "ours", vector, codec=codec, adapter_config=adapter_config)
    save_adapter(codec.unflatten(vector), LORA, tmp_path / "peft", "tiny-random-llama")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes()


def test_round_trip_is_exact(tmp_path, codec, save):
    state = _state(codec)
    path = save(tmp_path, codec, state)
    assert path == tmp_path / "round_0002"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    body = ckpt.read_checkpoint(path, config_hash="cfg1")
    loaded = ckpt.load_checkpoint(path, body, codec)
    np.testing.assert_array_equal(loaded.global_vector, state.global_vector)
    np.testing.assert_array_equal(loaded.server.arrays["m"], state.server.arrays["m"])
    np.testing.assert_array_equal(loaded.server.arrays["v"], state.server.arrays["v"])
    np.testing.assert_array_equal(loaded.control, state.control)
    assert loaded.server.steps == 2 and loaded.rounds_done == 2
    assert loaded.client_state == {3: {"round": 1, "sha256": "ab"}}
    assert loaded.metrics == state.metrics
    assert body["rng"]["seed"] == 0
    # The aggregation rule's state (centered clipping's center, FoolsGold's history) resumes too.
    np.testing.assert_array_equal(loaded.rule.center, state.rule.center)
    assert sorted(loaded.rule.history) == [4]
    np.testing.assert_array_equal(loaded.rule.history[4], state.rule.history[4])
    # the adapter is a PEFT directory
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 2


def test_find_latest_picks_most_rounds_and_ignores_temp_dirs(tmp_path, codec, save):
    save(tmp_path, codec, _state(codec, 2))
    save(tmp_path, codec, _state(codec, 10))
    (tmp_path / ".tmp-round_0011-dead").mkdir()
    assert ckpt.find_latest(tmp_path) == tmp_path / "round_0010"
    ckpt.remove_temp_dirs(tmp_path)
    assert not (tmp_path / ".tmp-round_0011-dead").exists()
    assert ckpt.find_latest(tmp_path / "missing") is None


def test_corrupted_file_is_refused(tmp_path, codec, save):
    path = save(tmp_path, codec, _state(codec))
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        ckpt.read_checkpoint(path, config_hash="cfg1")


def test_edited_state_json_is_refused(tmp_path, codec, save):
    path = save(tmp_path, codec, _state(codec))
    body = json.loads((path / "state.json").read_text())
    body["rounds_done"] = 5
    (path / "state.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="content hash"):
        ckpt.read_checkpoint(path, config_hash="cfg1")
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        ckpt.read_checkpoint(path, config_hash="cfg1")


def test_other_config_or_codec_is_refused(tmp_path, codec, save):
    path = save(tmp_path, codec, _state(codec))
    with pytest.raises(CheckpointError, match="config hash"):
        ckpt.read_checkpoint(path, config_hash="other")
    body = ckpt.read_checkpoint(path, config_hash="cfg1")
    other = AdapterCodec.from_state_dict({"x.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="layout"):
        ckpt.load_checkpoint(path, body, other)


def test_saving_a_round_again_replaces_it(tmp_path, codec, save):
    first = _state(codec)
    save(tmp_path, codec, first)
    second = _state(codec)
    second.global_vector = second.global_vector + 1
    path = save(tmp_path, codec, second)
    loaded = ckpt.load_checkpoint(path, ckpt.read_checkpoint(path, config_hash="cfg1"), codec)
    np.testing.assert_array_equal(loaded.global_vector, second.global_vector)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0002"]


def test_client_state_store(tmp_path):
    store = ckpt.ClientStateStore(tmp_path / "client_state")
    a = store.save(4, 0, np.array([1, 2, 3], np.float32))
    b = store.save(4, 2, np.array([4, 5, 6], np.float32))
    c = store.save(7, 1, np.array([0, 0, 1], np.float32))
    np.testing.assert_array_equal(store.load(4, a), [1, 2, 3])
    np.testing.assert_array_equal(store.load(4, b), [4, 5, 6])
    # the live index moved client 4 to round 2; the checkpoint still references round 0
    assert store.prune({4: b, 7: c}, {4: a}) == 0
    assert store.prune({4: b, 7: c}) == 1  # round 0 of client 4 is no longer referenced
    with pytest.raises(CheckpointError, match="missing"):
        store.load(4, a)
    store.path(7, 1).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        store.load(7, c)


def test_adapter_config_bytes_do_not_depend_on_the_process_hash_seed():
    """PEFT keeps target_modules as a set; its JSON order follows the string hash seed, so two
    runs of one config wrote different adapter_config.json bytes (and adapter fingerprints)."""
    import subprocess
    import sys

    code = ("from ray_fedit.config import LoraConfig; from ray_fedit.federation import checkpoint;"
            "print(checkpoint.render_adapter_config(LoraConfig(r=4, alpha=8, target_modules="
            "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj']), 'm'))")
    texts = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout
             for seed in (1, 2, 3)}
    assert len(texts) == 1
    assert json.loads(texts.pop())["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def test_wrapping_and_loading_adapters_warns_nothing(tmp_path, capsys):
    """The terminal shows the experiment: no PEFT base-name warning (the name PEFT overwrote),
    no transformers deprecation raised from PEFT's code, no weight-loading bar."""
    import warnings

    from ray_fedit.config import ModelConfig
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, load_peft, save_adapter, wrap_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))
        path = save_adapter(adapter_state(wrap_lora(model, LORA)), LORA, tmp_path / "a",
                            base_model="tiny-random-llama")
        base, _ = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))
        load_peft(base, path)
    assert [str(w.message) for w in caught] == []
    assert "Loading weights" not in capsys.readouterr().err
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "tiny-random-llama"


def test_only_the_weight_loading_bar_is_disabled():
    from ray_fedit.models.loading import _quiet_weight_loading

    def factory(*args, **kwargs):
        return args, kwargs

    assert _quiet_weight_loading(factory, ([1],), {"desc": "Loading weights"}) == \
        (([1],), {"desc": "Loading weights", "disable": True})
    assert _quiet_weight_loading(factory, (), {"desc": "Downloading"}) == ((), {"desc": "Downloading"})

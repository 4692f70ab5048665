"""The real bundled SmolLM2-135M-Instruct federated for 2 rounds x 2 clients x 2 local steps.

Small batches and sequences keep it under a minute on 2 CPU cores; the saved global adapter must
load with ``PeftModel.from_pretrained`` on the same base model and hold exactly the trained weights.
"""

from __future__ import annotations

import json
import time

import numpy as np

from ray_fedit.config import load_config
from ray_fedit.data.schema import make_record
from ray_fedit.federation import ClientSpec, run_federation


def test_smollm2_two_rounds_and_peft_load(ray_session, tmp_path):
    from peft import PeftModel

    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state

    cfg = load_config(None, [
        "model.name=smollm2-135m-instruct", "defense.name=none",
        "federation.num_clients=2", "federation.clients_per_round=2", "federation.rounds=2",
        "federation.local_steps=2", "federation.batch_size=2", "federation.lr=1e-3",
        "data.max_seq_len=64", "resources.num_workers=1", "resources.torch_threads=2",
    ])
    clients = [ClientSpec(c, [make_record(f"Name a colour, number {i}.",
                                          f"Colour {i}: {'blue' if c else 'red'}.", source="test")
                              for i in range(4)]) for c in range(2)]
    t0 = time.perf_counter()
    result = run_federation(cfg, tmp_path, clients)
    seconds = time.perf_counter() - t0
    assert result.finished and [r["round"] for r in result.rounds] == [1, 2]
    assert all(np.isfinite(r["mean_loss"]) for r in result.rounds)
    summary = json.loads((result.adapter_dir / "federation.json").read_text())
    assert summary["rounds_done"] == 2

    base, _ = load_model_and_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    loaded = result.codec.flatten(adapter_state(model))
    np.testing.assert_array_equal(loaded, result.global_vector)
    b_norm = sum(float(np.linalg.norm(v)) for k, v in result.adapter_state().items()
                 if "lora_B" in k)
    assert b_norm > 0  # B starts at zero: the federation trained it
    print(f"SmolLM2 federation: {seconds:.1f} s, rounds "
          f"{[round(r['seconds'], 1) for r in result.rounds]} s")

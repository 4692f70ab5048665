"""The resident hf generator against today's Ray Data path, on the shared local Ray.

Ray Data must form the batches :func:`ray_data_batches` says it forms, and the resident actor must
answer every call (with and without adapters, in any order of calls) bitwise as the Ray Data path
answers it.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from ray_fedit.config import GenerationConfig, LoraConfig, ModelConfig
from ray_fedit.generation import generate, resident
from ray_fedit.generation.hf import load_generator_model
from ray_fedit.generation.resident import from_items_num_blocks, ray_data_batches
from ray_fedit.models.lora import adapter_state, save_adapter, wrap_lora

TINY = ModelConfig(name="tiny-random-llama")
PROMPTS = ["How do I bake bread at home?", "Name a fruit.", "hi", "Write a haiku on rain.",
           "List three prime numbers and explain why.", "What is 2 + 2?", "Say yes.",
           "Describe the sea in one sentence, with colours.", "ok"]


class BatchRecorder:
    """Tags every row with the first and last index of the batch it came in."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        i = batch["i"]
        return {"i": i, "first": np.full(len(i), i[0]), "last": np.full(len(i), i[-1])}


@pytest.mark.parametrize(("rows", "batch_size"), [(9, 4), (33, 16), (250, 16), (403, 7)])
def test_ray_data_forms_the_predicted_batches(ray_session, rows, batch_size):
    ds = ray.data.from_items([{"i": i} for i in range(rows)]).map_batches(
        BatchRecorder, compute=ray.data.ActorPoolStrategy(size=1), batch_size=batch_size,
        batch_format="numpy", num_cpus=1)
    seen = {(int(r["first"]), int(r["last"]) + 1) for r in ds.take_all()}
    predicted = {(b.start, b.stop) for b in ray_data_batches(rows, batch_size,
                                                              from_items_num_blocks())}
    assert seen == predicted


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two LoRA adapters with random (non-zero) B, so each changes the tiny model's outputs."""
    out = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"adapter{seed}")
        model, _ = load_generator_model(TINY, None, "cpu")
        lora = LoraConfig(r=4, alpha=8)
        torch.manual_seed(seed)
        state = {k: torch.randn_like(v) * 0.5
                 for k, v in adapter_state(wrap_lora(model, lora)).items()}
        out.append(save_adapter(state, lora, path))
    return out


def answers(gen: GenerationConfig, adapter) -> list[tuple[str, int, str]]:
    rows = [{"instruction": p} for p in PROMPTS]
    out = generate(rows, prompt_field="instruction", model_cfg=TINY, gen_cfg=gen,
                   template="chat", adapter_dir=adapter, seed=5)
    return [(o["response"], o["num_generated_tokens"], o["finish_reason"]) for o in out]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_resident_actor_answers_bitwise_as_ray_data(ray_session, adapters, monkeypatch,
                                                        temperature):
    gen = GenerationConfig(batch_size=4, max_new_tokens=6, temperature=temperature,
                           torch_threads=1)
    calls = [adapters[0], None, adapters[1], adapters[0]]  # swaps return to the exact base
    assert resident.serves(gen)
    kept = [answers(gen, a) for a in calls]
    monkeypatch.setattr(resident, "serves", lambda gen: False)  # today's Ray Data pool per call
    pooled = [answers(gen, a) for a in calls]

    assert kept == pooled
    assert kept[0] == kept[3]
    if temperature:  # sampled answers tell the adapters apart (greedy ones may all be blank)
        assert kept[0] != kept[1] and kept[0] != kept[2]
    # one actor served every resident call
    assert len([k for k in resident._ACTORS if '"tiny-random-llama"' in k[1]]) == 1


def test_a_tiny_runs_evaluation_responses_are_those_of_ray_data(ray_session, tmp_path,
                                                                monkeypatch):
    """The tiny config's evaluate stage on the resident actor, then again on Ray Data pools: the
    same responses for every adapter (no attack, attacked)."""
    from ray_fedit.config import load_config
    from ray_fedit.data.schema import from_rows
    from ray_fedit.evaluation import evaluate_adapter
    from ray_fedit.evaluation.runner import RESPONSES_FILE
    from ray_fedit.pipeline import _read_records, run_pipeline
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "tests/assets/tiny_run.yaml", [
        f"output.root={tmp_path}", "federation.rounds=1", "federation.local_steps=1",
        "generation.temperature=1.0", "generation.batch_size=3"])
    run = run_pipeline(cfg, stages=["prepare", "federate", "evaluate"])["run_dir"]
    monkeypatch.setattr(resident, "serves", lambda gen: False)
    benign = from_rows(_read_records(tmp_path.joinpath(run, "data", "benign_eval.parquet")))
    for stage in ("no_attack", "attacked"):
        kept = tmp_path.joinpath(run, "eval", stage, RESPONSES_FILE)
        adapter = tmp_path.joinpath(run, *(["no_attack"] if stage == "no_attack" else []),
                                    "checkpoints", "final")
        evaluate_adapter(cfg, stage=stage, adapter_dir=adapter, out_dir=tmp_path / stage,
                         benign_records=benign)
        pooled = _read_records(tmp_path / stage / RESPONSES_FILE)
        assert len(pooled) == 8
        assert _read_records(kept) == pooled, stage


def test_a_call_that_fails_in_the_actor_stops_it_and_the_next_call_loads_afresh(ray_session,
                                                                               tmp_path):
    gen = GenerationConfig(batch_size=4, max_new_tokens=4, torch_threads=1)
    with pytest.raises(Exception, match="adapter_config.json"):
        answers(gen, tmp_path)  # no adapter there: PEFT fails inside the actor
    assert not resident._ACTORS
    assert len(answers(gen, None)) == len(PROMPTS)


@pytest.mark.parametrize("resident_actor", [True, False], ids=["resident", "ray-data"])
def test_answers_are_counted_as_they_arrive(ray_session, adapters, monkeypatch, resident_actor):
    """``progress=`` counts every answer once, batch by batch as they arrive (the resident actor
    streams its batches), and the answers are those of an uncounted call."""
    from ray_fedit import console

    counts: list[int] = []

    class Recorder(console.ItemProgress):
        def update(self, n: int) -> None:
            counts.append(n)
            super().update(n)

    monkeypatch.setattr(console, "ItemProgress", Recorder)
    if not resident_actor:
        monkeypatch.setattr(resident, "serves", lambda gen: False)
    gen = GenerationConfig(batch_size=2, max_new_tokens=4, torch_threads=1)
    rows = [{"instruction": p} for p in PROMPTS]
    plain = generate(rows, prompt_field="instruction", model_cfg=TINY, gen_cfg=gen,
                     template="chat", adapter_dir=adapters[0], seed=5)
    counted = generate(rows, prompt_field="instruction", model_cfg=TINY, gen_cfg=gen,
                       template="chat", adapter_dir=adapters[0], seed=5, progress="test: answers")
    assert counted == plain
    assert sum(counts) == len(PROMPTS)
    if resident_actor:  # one count per batch the resident actor answered
        assert counts == [len(b) for b in ray_data_batches(len(PROMPTS), 2,
                                                           from_items_num_blocks())]
    else:
        assert counts == [1] * len(PROMPTS)


def test_an_evaluations_model_work_on_the_resident_actor_equals_the_ray_task(
        ray_session, adapters, tmp_path, monkeypatch):
    """The probe judge and the benign NLL, read from the resident actor's loaded model, give
    the bitwise verdicts, probabilities and NLLs of the Ray task that loads the models afresh."""
    import pyarrow.parquet as pq

    from ray_fedit.config import load_config
    from ray_fedit.data.schema import make_record
    from ray_fedit.evaluation import evaluate_adapter, judging

    cfg = load_config(None, [
        "model.name=tiny-random-llama", "defense.name=none", "seed=2",
        "evaluation.benchmarks=[{name: advbench, num_prompts: 4}]",
        "evaluation.judges=[rule,probe]", "evaluation.probe_model=tiny-random-llama",
        "evaluation.num_benign_prompts=3", "evaluation.bootstrap_samples=100",
        "generation.max_new_tokens=6", "generation.batch_size=2", "generation.torch_threads=2",
        "generation.temperature=1.0"])
    benign = [make_record(f"Name color number {i}.", f"Color {i} is blue.", source="held_out")
              for i in range(3)]
    calls: list[str] = []
    real_submit = resident.submit

    def spy(model_cfg, threads, fn, *args):
        calls.append(fn.__name__)
        return real_submit(model_cfg, threads, fn, *args)

    monkeypatch.setattr(resident, "submit", spy)

    def evaluate(name: str) -> tuple[dict, list, list]:
        out = tmp_path / name
        metrics = evaluate_adapter(cfg, stage=name, adapter_dir=adapters[1], out_dir=out,
                                   benign_records=benign)
        metrics.pop("timing_s")
        metrics.pop("stage")
        return (metrics, pq.read_table(out / "advbench.parquet").to_pylist(),
                pq.read_table(out / "benign.parquet").to_pylist())

    on_resident = evaluate("resident")
    assert calls == ["_model_work_on"]
    monkeypatch.setattr(judging, "reads_loaded_model", lambda *a: False)  # the Ray task instead
    in_task = evaluate("task")
    assert calls == ["_model_work_on"]

    assert on_resident == in_task
    _, adv, benign_rows = on_resident
    assert all("probe_refusal_prob" in r for r in adv) and len(adv) == 4
    assert all(r["nll"] is not None and r["nll"] > 0 for r in benign_rows)


def _slow_answer():
    """Work for the resident actor: mark that it started, wait, then read the model. Nested, so
    cloudpickle sends it by value (the actor's process need not import this test module)."""

    def answer(model, tokenizer, seconds, marker):
        import pathlib
        import time

        pathlib.Path(marker).touch()
        time.sleep(seconds)
        return model.config.num_hidden_layers

    return answer


def _wait_for(path, timeout_s=120.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_submitted_work_is_repeated_on_a_fresh_actor_when_its_actor_dies(ray_session, tmp_path):
    resident.release()
    marker = tmp_path / "started"
    wait = resident.submit(TINY, 1, _slow_answer(), 2.0, str(marker))
    (actor,) = resident._ACTORS.values()
    _wait_for(marker)  # the work is running on the actor
    marker.unlink()
    ray.kill(actor, no_restart=True)  # it dies under the call, as a killed process would
    assert wait() == 2  # the tiny model's layers, read on the actor that replaced it
    assert marker.exists()  # the work ran again there
    (fresh,) = resident._ACTORS.values()
    assert fresh != actor


def test_work_on_an_actor_the_run_released_is_not_repeated(ray_session, tmp_path):
    from ray.exceptions import RayActorError

    resident.release()
    marker = tmp_path / "started"
    wait = resident.submit(TINY, 1, _slow_answer(), 30.0, str(marker))
    _wait_for(marker)
    resident.release()  # the run ends (an error elsewhere, Ctrl-C) while the work is out
    with pytest.raises(RayActorError):
        wait()
    assert not resident._ACTORS  # no fresh actor was started for it

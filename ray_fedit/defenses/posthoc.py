"""The post-hoc defense of Ye et al. (ICLR 2025, arXiv 2406.10630, Sec. 5).

After FedIT ends, the server fine-tunes the final global LoRA adapter on a small defense set that mixes
aligned pairs (harmful instruction -> safe refusal) and normal pairs (instruction -> helpful answer).
It needs no client or update filtering, so it composes with every aggregator (paper Table 3). The paper
runs it as 50 rounds x 10 steps of one-client FL (1,000 samples, batch 16, lr 5e-5 cosine to 1e-6 per
round, a fresh AdamW each round); ``defense.steps_per_round`` reproduces that schedule.

Registered defenses:

- ``posthoc``: start from the attacked global adapter (the paper's defense).
- ``pretrained``: start from a fresh adapter on the base model (paper Fig. 7, "Local+Gen").

The fine-tune is a Ray Train ``TorchTrainer`` job: ``defense.num_workers`` data-parallel workers (DDP over
gloo on CPU, NCCL on GPU), or DeepSpeed ZeRO when ``defense.deepspeed`` names a JSON config. Rank 0
saves the adapter in PEFT format every ``checkpoint_every`` steps (the paper's steps ablation, Fig. 6)
and reports it to Ray Train as a checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_fedit.config import RunConfig
from ray_fedit.data.schema import Record
from ray_fedit.errors import ConfigError
from ray_fedit.registry import DEFENSES

STEP_DIR = "step_{:04d}"


@dataclass(frozen=True)
class DefenseResult:
    """The defended adapter, the intermediate checkpoints (step -> dir) and the training curve."""

    adapter_dir: Path
    checkpoints: dict[int, Path]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def round_plan(steps: int, steps_per_round: int) -> list[int]:
    """Steps in each round: full rounds, then the remainder (500, 10 -> fifty 10s; 25, 10 -> 10, 10, 5)."""
    full, rest = divmod(steps, steps_per_round)
    return [steps_per_round] * full + ([rest] if rest else [])


def checkpoint_steps(steps: int, every: int, plan: list[int]) -> list[int]:
    """Steps after which an adapter is saved: multiples of ``every`` reachable at round ends, and the end."""
    ends = [sum(plan[: i + 1]) for i in range(len(plan))]
    marks = sorted({e for e in ends if e % every == 0} | {steps})
    return marks


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: load the model and adapter, train its shard, save and report checkpoints."""
    import numpy as np
    import ray.train
    import torch
    from ray.train import Checkpoint

    from ray_fedit.federation.sampling import derive_seed, numpy_generator
    from ray_fedit.federation.sft import (
        TrainConfig,
        batch_order,
        collate,
        cosine_learning_rate,
        count_targets,
        response_loss,
        tokenize_records,
        train_steps,
    )
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, load_adapter, load_adapter_state, save_adapter, wrap_lora

    cfg = RunConfig.model_validate(config["cfg"])
    d = cfg.defense
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.resources.torch_threads)
    device = ray.train.torch.get_device() if d.use_gpu else torch.device("cpu")
    torch.manual_seed(derive_seed(cfg.seed, 0, rank, "defense-init"))

    model, tok = load_model_and_tokenizer(cfg.model, device)
    peft_model = wrap_lora(model, cfg.lora, base_model=cfg.model.name)
    if config["init_adapter"]:
        state, _ = load_adapter(config["init_adapter"])
        load_adapter_state(peft_model, state)
    records = config["records"][rank::world]
    examples = tokenize_records(tok, records, template=cfg.data.template, max_seq_len=cfg.data.max_seq_len)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    per_worker = d.batch_size // world
    plan = round_plan(d.steps, d.steps_per_round)
    marks = set(checkpoint_steps(d.steps, d.checkpoint_every, plan))
    out_dir = Path(config["out_dir"])

    engine = None
    if config["deepspeed_config"] is not None:
        import deepspeed

        ds_config = dict(config["deepspeed_config"])
        ds_config.update(train_micro_batch_size_per_gpu=per_worker, gradient_accumulation_steps=1,
                         train_batch_size=per_worker * world)
        if d.max_grad_norm is not None:
            ds_config["gradient_clipping"] = d.max_grad_norm
        engine, _, _, _ = deepspeed.initialize(model=peft_model, model_parameters=params,
                                               config=ds_config, dist_init_required=False)
        train_model = engine
    else:
        train_model = ray.train.torch.prepare_model(peft_model, move_to_device=False) \
            if world > 1 else peft_model

    done, losses = 0, []
    for rnd, k in enumerate(plan):
        lr = cosine_learning_rate(rnd, len(plan), d.lr, d.lr_min)
        order = batch_order(len(examples), k, per_worker, 1, numpy_generator(cfg.seed, rnd, rank, "defense"))
        torch.manual_seed(derive_seed(cfg.seed, rnd, rank, "defense-dropout"))
        if engine is None:
            stats = train_steps(train_model, params, examples, order,
                                TrainConfig(steps=k, batch_size=per_worker, lr=lr,
                                            max_grad_norm=d.max_grad_norm),
                                pad_id=tok.pad_token_id)
            step_losses = stats.step_losses
        else:  # DeepSpeed owns the optimizer (kept across rounds) and the backward pass
            step_losses = []
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            engine.train()
            for micro in order:
                b = collate([examples[int(i)] for i in micro[0]], tok.pad_token_id)
                n = max(count_targets(b["labels"]), 1)
                logits = engine(input_ids=b["input_ids"].to(device),
                                attention_mask=b["attention_mask"].to(device)).logits
                summed, _ = response_loss(logits, b["labels"].to(device))
                engine.backward(summed / n)
                engine.step()
                step_losses.append(float(summed.detach()) / n)
        losses.extend(step_losses)
        done += k
        metrics = {"step": done, "round": rnd, "lr": lr,
                   "loss": float(np.nanmean(step_losses)) if step_losses else float("nan")}
        if done in marks:
            checkpoint = None
            if rank == 0:
                step_dir = save_adapter(adapter_state(peft_model), cfg.lora, out_dir / STEP_DIR.format(done),
                                        base_model=cfg.model.name)
                (step_dir / "defense_losses.json").write_text(json.dumps(losses))
                checkpoint = Checkpoint.from_directory(str(step_dir))
            ray.train.report(metrics, checkpoint=checkpoint)
    if rank == 0:
        print(f"[defense] {done} steps, final loss {np.nanmean(losses[-k:]):.4f}", flush=True)


def _read_deepspeed_config(path: str | None) -> dict[str, Any] | None:
    """The DeepSpeed JSON named by ``defense.deepspeed``, or None.

    Raises:
        ConfigError: naming the file when it is missing or not a JSON object.
    """
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"defense.deepspeed={path!r}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"defense.deepspeed={path!r}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"defense.deepspeed={path!r}: must hold a JSON object")
    return data


def finetune_adapter(cfg: RunConfig, records: list[Record], *, init_adapter: Path | None,
                     out_dir: Path) -> DefenseResult:
    """Fine-tune a LoRA adapter on ``records`` with Ray Train; returns the saved adapters.

    Args:
        cfg: the run config (``defense`` section: steps, schedule, batch, workers, DeepSpeed).
        records: the defense set (aligned + normal pairs).
        init_adapter: PEFT adapter to start from; None starts a fresh adapter on the base model.
        out_dir: where ``step_XXXX/`` adapters are written.

    Raises:
        ValueError: if ``records`` is empty.
    """
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_fedit.resources import defense_worker_resources

    if not records:
        raise ValueError("the defense set is empty; check the defense data stage")
    d = cfg.defense
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Ray Train workers run in their own working directory: hand them absolute paths, and the
    # DeepSpeed config as read here (a bad file fails now, naming the file).
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "records": list(records),
                           "init_adapter": str(Path(init_adapter).resolve()) if init_adapter else None,
                           "deepspeed_config": _read_deepspeed_config(d.deepspeed),
                           "out_dir": str(out_dir)},
        scaling_config=ScalingConfig(
            num_workers=d.num_workers, use_gpu=d.use_gpu,
            resources_per_worker=defense_worker_resources(cfg.resources, d.use_gpu)),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=TrainRunConfig(name="defense", storage_path=str(out_dir / "ray_train")),
    )
    trainer.fit()
    plan = round_plan(d.steps, d.steps_per_round)
    marks = checkpoint_steps(d.steps, d.checkpoint_every, plan)
    checkpoints = {s: out_dir / STEP_DIR.format(s) for s in marks}
    missing = [str(p) for p in checkpoints.values() if not (p / "adapter_config.json").is_file()]
    if missing:
        raise RuntimeError(f"the defense job finished without writing {missing}")
    losses = json.loads((checkpoints[d.steps] / "defense_losses.json").read_text())
    return DefenseResult(adapter_dir=checkpoints[d.steps], checkpoints=checkpoints, losses=losses,
                         seconds=time.perf_counter() - t0)


@DEFENSES.register("posthoc", starts_from="global")
def posthoc(cfg: RunConfig, records: list[Record], *, global_adapter: Path | None,
            out_dir: Path) -> DefenseResult:
    """Fine-tune the final global adapter on the defense set (the paper's defense)."""
    if global_adapter is None:
        raise ValueError("defense.name=posthoc needs the global adapter of the federate stage")
    return finetune_adapter(cfg, records, init_adapter=global_adapter, out_dir=out_dir)


@DEFENSES.register("pretrained", starts_from="base")
def pretrained(cfg: RunConfig, records: list[Record], *, global_adapter: Path | None,
               out_dir: Path) -> DefenseResult:
    """Fine-tune a fresh adapter on the base model with the defense set alone (paper Fig. 7)."""
    return finetune_adapter(cfg, records, init_adapter=None, out_dir=out_dir)

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
gloo on CPU, NCCL on GPU), or DeepSpeed ZeRO when ``defense.deepspeed`` names a JSON config. Either way
a step's loss is the mean over the target tokens of all workers (:mod:`.posthoc_math`), every worker
joins every backward pass (one without target tokens back-propagates a zero loss), and the optimizer
restarts each round. Rank 0 saves the adapter in PEFT format every ``checkpoint_every`` steps (the
paper's steps ablation, Fig. 6), after all ranks gather it under ZeRO-3, and reports it to Ray Train
as a checkpoint. A worker that dies restarts the group (Ray Train's ``FailureConfig``, up to
``resources.max_restarts`` times) from the last checkpoint, with the adapter the uninterrupted run
would have, bitwise. Rank 0 also appends each round's step and mean loss to
``defense_progress.jsonl``, which the caller shows while ``fit`` runs (a bar with ETA on a
terminal, plain lines elsewhere).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_fedit import console
from ray_fedit.config import RunConfig
from ray_fedit.data.schema import Record
from ray_fedit.errors import ConfigError
from ray_fedit.registry import DEFENSES

STEP_DIR = "step_{:04d}"
# torch.distributed's default: a rank stuck in a collective fails the job after this many seconds
PROCESS_GROUP_TIMEOUT_S = 1800

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefenseResult:
    """The defended adapter, the intermediate checkpoints (step -> dir), the training curve, and
    the steps after which a restarted worker group resumed (empty when no worker died)."""

    adapter_dir: Path
    checkpoints: dict[int, Path]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_after: list[int] = field(default_factory=list)


STARTS_FILE = "worker_group_starts.json"
# One line per defense round, appended by rank 0 and shown by the caller while Ray Train runs.
PROGRESS_FILE = "defense_progress.jsonl"


def round_plan(steps: int, steps_per_round: int) -> list[int]:
    """Steps in each round: full rounds, then the remainder (500, 10 -> fifty 10s; 25, 10 -> 10, 10, 5)."""
    full, rest = divmod(steps, steps_per_round)
    return [steps_per_round] * full + ([rest] if rest else [])


def checkpoint_steps(steps: int, every: int, plan: list[int]) -> list[int]:
    """Steps after which an adapter is saved: multiples of ``every`` reachable at round ends, and the end."""
    ends = [sum(plan[: i + 1]) for i in range(len(plan))]
    marks = sorted({e for e in ends if e % every == 0} | {steps})
    return marks


def worker_order(seed: int, round_index: int, rank: int, num_examples: int, steps: int,
                 per_worker: int) -> Any:
    """Indices into a worker's shard for each step of one round: an int array ``(steps, per_worker)``."""
    from ray_fedit.federation.sampling import numpy_generator
    from ray_fedit.federation.sft import batch_order

    rng = numpy_generator(seed, round_index, rank, "defense")
    return batch_order(num_examples, steps, per_worker, 1, rng)[:, 0]


def build_lora_model(cfg: RunConfig, init_adapter: str | Path | None, device: Any) -> tuple[Any, Any]:
    """The base model wrapped in LoRA, the same on every rank, and its tokenizer.

    The LoRA init is seeded from ``cfg.seed`` alone, never the rank: DDP and DeepSpeed copy rank
    0's weights at start-up, but a fresh adapter (``pretrained``) must not depend on that.
    ``init_adapter`` (a PEFT directory) overwrites the init.
    """
    import torch

    from ray_fedit.federation.sampling import NO_CLIENT, derive_seed
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import load_adapter, load_adapter_state, wrap_lora

    model, tok = load_model_and_tokenizer(cfg.model, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, 0, NO_CLIENT, "defense-init"))
        peft_model = wrap_lora(model, cfg.lora)
    if init_adapter:
        state, _ = load_adapter(init_adapter)
        load_adapter_state(peft_model, state)
    return peft_model, tok


def torch_optimizers(optimizer: Any) -> list[Any]:
    """The torch optimizers inside a DeepSpeed engine's ``optimizer``: itself (ZeRO-0 in fp32), or
    the ``optimizer`` a ZeRO / bf16 wrapper holds, plus ZeRO-3's ``backup_optimizer`` (partial
    optimizer offload)."""
    import torch

    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return [o for o in (getattr(optimizer, "optimizer", None), getattr(optimizer, "backup_optimizer", None))
            if isinstance(o, torch.optim.Optimizer)]


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: load the model and adapter, train its shard, save and report checkpoints.

    Every rank runs every collective of every step (token count, backward, loss), also when its
    own batch holds no target token; a step without target tokens on any rank is skipped by all.
    """
    import contextlib

    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from ray_fedit.defenses.posthoc_math import restart_optimizer, scaled_loss
    from ray_fedit.federation.sampling import derive_seed
    from ray_fedit.federation.sft import (
        collate,
        cosine_learning_rate,
        count_targets,
        response_loss,
        tokenize_records,
    )
    from ray_fedit.models.lora import adapter_state, save_adapter

    cfg = RunConfig.model_validate(config["cfg"])
    d = cfg.defense
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.resources.torch_threads)
    device = ray.train.torch.get_device() if d.use_gpu else torch.device("cpu")

    def all_ranks_sum(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return float(t)

    # A restarted worker group (FailureConfig) continues from the last reported checkpoint: an
    # adapter saved at a round end, where a fresh optimizer and a reseeded dropout start anyway, so
    # the rest of the run is bitwise the uninterrupted one.
    resumed = ray.train.get_checkpoint()
    plan = round_plan(d.steps, d.steps_per_round)
    if resumed is None:
        peft_model, tok = build_lora_model(cfg, config["init_adapter"], device)
        losses: list[float] = []
    else:
        with resumed.as_directory() as saved:
            peft_model, tok = build_lora_model(cfg, saved, device)
            losses = json.loads((Path(saved) / "defense_losses.json").read_text())
    ends = [sum(plan[:i]) for i in range(len(plan) + 1)]
    if len(losses) not in ends:
        raise RuntimeError(f"the defense checkpoint holds {len(losses)} steps, not a round end of "
                           f"{plan}; it belongs to another defense schedule")
    first_round = ends.index(len(losses))
    if rank == 0:  # every start of the group, with the step it starts after (0: from the top)
        log_file = Path(config["out_dir"]) / STARTS_FILE
        earlier = json.loads(log_file.read_text()) if log_file.is_file() else []
        log_file.write_text(json.dumps([*earlier, len(losses)]))
        if earlier:
            print(f"[defense] restarted after step {len(losses)} (round {first_round} of "
                  f"{len(plan)})", flush=True)
    records = config["records"][rank::world]
    examples = tokenize_records(tok, records, template=cfg.data.template, max_seq_len=cfg.data.max_seq_len)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    per_worker = d.batch_size // world
    marks = set(checkpoint_steps(d.steps, d.checkpoint_every, plan))
    out_dir = Path(config["out_dir"])

    engine, zero3 = None, False
    if config["deepspeed_config"] is not None:
        import deepspeed

        ds_config = dict(config["deepspeed_config"])
        ds_config.update(train_micro_batch_size_per_gpu=per_worker, gradient_accumulation_steps=1,
                         train_batch_size=per_worker * world)
        if d.max_grad_norm is not None:
            ds_config["gradient_clipping"] = d.max_grad_norm
        engine, _, _, _ = deepspeed.initialize(model=peft_model, model_parameters=params,
                                               config=ds_config, dist_init_required=False)
        train_model, optimizers = engine, torch_optimizers(engine.optimizer)
        zero3 = engine.zero_optimization_stage() == 3
    else:
        train_model = ray.train.torch.prepare_model(peft_model, move_to_device=False) \
            if world > 1 else peft_model
        optimizers = [torch.optim.AdamW(params, lr=d.lr, weight_decay=0.0)]

    def optimizer_step(loss: torch.Tensor) -> None:
        if engine is not None:  # DeepSpeed averages, clips and steps
            engine.backward(loss)
            engine.step()
            return
        optimizers[0].zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over ranks here
        if d.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, d.max_grad_norm)
        optimizers[0].step()

    train_model.train()
    done = len(losses)
    for rnd, k in enumerate(plan):
        if rnd < first_round:
            continue
        # --- a fresh AdamW each round; lr constant within the round, cosine across rounds ---
        lr = cosine_learning_rate(rnd, len(plan), d.lr, d.lr_min)
        for opt in optimizers:
            restart_optimizer(opt, lr)
        order = worker_order(cfg.seed, rnd, rank, len(examples), k, per_worker)
        torch.manual_seed(derive_seed(cfg.seed, rnd, rank, "defense-dropout"))
        step_losses = []
        for micro in order:
            b = collate([examples[int(i)] for i in micro], tok.pad_token_id)
            tokens = all_ranks_sum(count_targets(b["labels"]))
            if tokens == 0:  # no rank has a target token: all skip the step together
                step_losses.append(float("nan"))
                continue
            logits = train_model(input_ids=b["input_ids"].to(device),
                                 attention_mask=b["attention_mask"].to(device)).logits
            summed, _ = response_loss(logits, b["labels"].to(device))
            optimizer_step(scaled_loss(summed, world, int(tokens)))
            step_losses.append(all_ranks_sum(float(summed.detach())) / tokens)
        losses.extend(step_losses)
        done += k
        metrics = {"step": done, "round": rnd, "lr": lr,
                   "loss": float(np.nanmean(step_losses)) if step_losses else float("nan")}
        if rank == 0:  # the caller shows it (finetune_adapter)
            with (out_dir / PROGRESS_FILE).open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        if done in marks:
            # --- save: under ZeRO-3 the LoRA tensors are partitioned; every rank joins the gather ---
            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 \
                else contextlib.nullcontext()
            with gather:
                state = adapter_state(peft_model) if rank == 0 else None
            checkpoint = None
            if rank == 0:
                step_dir = save_adapter(state, cfg.lora, out_dir / STEP_DIR.format(done),
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
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_fedit.resources import defense_worker_resources

    if not records:
        raise ValueError("the defense set is empty; check the defense data stage")
    d = cfg.defense
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STARTS_FILE).unlink(missing_ok=True)
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
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
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo", timeout_s=PROCESS_GROUP_TIMEOUT_S),
        # A worker that dies restarts the group from the last checkpoint, up to max_restarts times.
        run_config=TrainRunConfig(name="defense", storage_path=str(out_dir / "ray_train"),
                                  failure_config=FailureConfig(
                                      max_failures=cfg.resources.max_restarts)),
    )
    progress = console.ItemProgress(d.steps, "defense", unit="steps")

    def show() -> None:
        records = console.read_jsonl(out_dir / PROGRESS_FILE)
        if records:
            last = records[-1]
            progress.update(last["step"] - progress.done, note=f"loss {last['loss']:.4f}")

    try:
        with console.watching(show):
            trainer.fit()
    finally:
        progress.close()
    plan = round_plan(d.steps, d.steps_per_round)
    marks = checkpoint_steps(d.steps, d.checkpoint_every, plan)
    checkpoints = {s: out_dir / STEP_DIR.format(s) for s in marks}
    missing = [str(p) for p in checkpoints.values() if not (p / "adapter_config.json").is_file()]
    if missing:
        raise RuntimeError(f"the defense job finished without writing {missing}")
    losses = json.loads((checkpoints[d.steps] / "defense_losses.json").read_text())
    starts = out_dir / STARTS_FILE
    resumed_after = json.loads(starts.read_text())[1:] if starts.is_file() else []
    if resumed_after:
        log.warning("the defense job lost a worker and resumed after step(s) %s", resumed_after)
    return DefenseResult(adapter_dir=checkpoints[d.steps], checkpoints=checkpoints, losses=losses,
                         seconds=time.perf_counter() - t0, resumed_after=resumed_after)


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

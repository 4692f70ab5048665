"""Overhead of ray_fedit's federation over a plain in-process loop doing the same client work.

    .venv/bin/python benchmarks/federation_overhead.py                # tiny model and SmolLM2
    .venv/bin/python benchmarks/federation_overhead.py --models tiny-random-llama --rounds 4

For each model, the same clients (3 by default), local steps (5), batches (4 x <=128 tokens),
seeds and torch threads (2) run twice:

- baseline: one process, one model, a sequential loop over clients calling the same
  ``ray_fedit.federation.sft`` functions, then the mean of the deltas;
- ray_fedit: ``run_federation`` with one trainer worker (the fastest layout on 2 cores, see
  docs/ENVIRONMENT.md), reading each round's wall time from rounds.jsonl.

It prints per-round seconds and the ratio ray_fedit / baseline over the steady rounds (round 1 is
reported apart: both sides tokenize then), alternating the two sides ``--repeats`` times and taking
each side's fastest repeat, since other load on the machine only ever slows a side down. Model
loading and worker start-up are not rounds and are excluded from both. Both sides must end with the
bitwise same adapter (the same work), which it checks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ray_fedit.config import RunConfig, load_config  # noqa: E402
from ray_fedit.data.schema import Record, make_record  # noqa: E402

RAY_WORKER_NICENESS = 15


def make_clients(num_clients: int, per_client: int) -> list[list[Record]]:
    words = ("federated learning trains a shared model across many clients without moving their "
             "data to a server and each round the server averages the updates").split()
    out = []
    for c in range(num_clients):
        recs = []
        for i in range(per_client):
            n = 20 + (7 * i + 3 * c) % 40
            text = " ".join(words[(i + j + c) % len(words)] for j in range(n))
            recs.append(make_record(f"Client {c}, question {i}: explain point {i % 5}.",
                                    text.capitalize() + ".", source="bench"))
        out.append(recs)
    return out


def baseline(cfg: RunConfig, clients: list[list[Record]],
             sample: Callable[[int], Sequence[int]] | None = None) -> tuple[list[float], np.ndarray]:
    """The same client work in one process: sequential clients, mean of deltas, no Ray.

    ``sample(round_index)`` gives the clients of a round (default: every client).
    """
    from ray_fedit.aggregators import aggregate
    from ray_fedit.federation.sampling import NO_CLIENT, derive_seed, numpy_generator
    from ray_fedit.federation.sft import (
        ParamView,
        TrainConfig,
        batch_order,
        cosine_learning_rate,
        tokenize_records,
        train_steps,
    )
    from ray_fedit.models.codec import AdapterCodec
    from ray_fedit.models.loading import load_model_and_tokenizer
    from ray_fedit.models.lora import adapter_state, wrap_lora

    fed = cfg.federation
    torch.set_num_threads(cfg.resources.torch_threads)
    model, tok = load_model_and_tokenizer(cfg.model)
    torch.manual_seed(derive_seed(cfg.seed, 0, NO_CLIENT, "lora_init"))
    model = wrap_lora(model, cfg.lora)
    view = ParamView(model, AdapterCodec.from_state_dict(adapter_state(model)))
    x = view.get_flat()
    cache: dict[int, list] = {}
    times = []
    for rnd in range(fed.rounds):
        t0 = time.perf_counter()
        lr = cosine_learning_rate(rnd, fed.rounds, fed.lr, fed.lr_min)
        deltas = []
        for c in (range(fed.num_clients) if sample is None else sample(rnd)):
            torch.manual_seed(derive_seed(cfg.seed, rnd, c, "dropout"))
            if c not in cache:
                cache[c] = tokenize_records(tok, clients[c], template=cfg.data.template,
                                            max_seq_len=cfg.data.max_seq_len)
            order = batch_order(len(cache[c]), fed.local_steps, fed.batch_size, fed.grad_accum,
                                numpy_generator(cfg.seed, rnd, c, "batches"))
            view.set_flat(x)
            train_steps(model, view.params, cache[c], order,
                        TrainConfig(steps=fed.local_steps, batch_size=fed.batch_size,
                                    grad_accum=fed.grad_accum, lr=lr,
                                    weight_decay=fed.weight_decay,
                                    max_grad_norm=fed.max_grad_norm),
                        pad_id=tok.pad_token_id)
            deltas.append(view.get_flat() - x)
        n = fed.local_steps * fed.batch_size * fed.grad_accum
        agg = aggregate("mean", torch.from_numpy(np.stack(deltas)),
                        torch.full((len(deltas),), float(n)))
        x = x + np.float32(fed.resolved_server_lr) * agg.aggregate.numpy()
        times.append(time.perf_counter() - t0)
    return times, x


def federated(cfg: RunConfig, clients: list[list[Record]]) -> tuple[list[float], np.ndarray]:
    from ray_fedit.federation import ClientSpec, run_federation

    specs = [ClientSpec(c, recs) for c, recs in enumerate(clients)]
    with tempfile.TemporaryDirectory() as run_dir:
        result = run_federation(cfg, run_dir, specs)
    return [r["seconds"] for r in result.rounds], result.global_vector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=["tiny-random-llama", "smollm2-135m-instruct"])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternate baseline and ray_fedit this many times; the fastest "
                        "repeat of each side counts (other load on the machine only slows down)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import ray

    # Ray starts its workers at niceness 15 (Ray's worker_niceness): give the in-process baseline
    # the same priority, so other load on a shared machine slows both sides alike.
    os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    print(f"{'model':24} {'side':9} {'round 1 s':>9} {'steady s/round (each repeat)':>30}")
    for name in args.models:
        cfg = load_config(None, [
            f"model.name={name}", "defense.name=none", "federation.lr=1e-3",
            f"federation.num_clients={args.clients}",
            f"federation.clients_per_round={args.clients}",
            f"federation.rounds={args.rounds}", f"federation.local_steps={args.steps}",
            f"federation.batch_size={args.batch_size}", f"data.max_seq_len={args.max_seq_len}",
            "resources.num_workers=1", f"resources.torch_threads={args.threads}",
            "federation.checkpoint_every=0",
        ])
        clients = make_clients(args.clients, per_client=args.steps * args.batch_size)
        steady: dict[str, list[float]] = {"baseline": [], "ray_fedit": []}
        same = True
        for _ in range(args.repeats):
            for side, fn in (("baseline", baseline), ("ray_fedit", federated)):
                times, x = fn(cfg, clients)
                steady[side].append(statistics.mean(times[1:]) if len(times) > 1 else times[0])
                print(f"{name:24} {side:9} {times[0]:9.2f} {steady[side][-1]:30.2f}", flush=True)
                if side == "baseline":
                    base_x = x
                else:
                    same = same and bool(np.array_equal(base_x, x))
        ratio = min(steady["ray_fedit"]) / min(steady["baseline"])
        print(f"{name:24} ratio ray_fedit / baseline (fastest repeats): {ratio:.3f}; "
              f"same final adapter (bitwise): {same}")
    ray.shutdown()


if __name__ == "__main__":
    main()

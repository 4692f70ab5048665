"""Throughput of the ``hf`` engine on the bundled SmolLM2 at several batch sizes, same prompts, same run.

Run:
    .venv/bin/python benchmarks/generation.py                # batch 1 vs 16, model loaded once
    .venv/bin/python benchmarks/generation.py --pipeline     # also through Ray Data (generate())
    .venv/bin/python benchmarks/generation.py --prompts 112 --max-new-tokens 32 --batch-sizes 16,56
        # an evaluation's 48 + 64 prompts at the quickstart's token limit

Tokens/s counts generated tokens (up to and including EOS) over wall-clock time. Decoding is greedy
and stops at EOS, as in the data pipelines, so batch 16 also pays for rows that finished early.
The settings are interleaved chunk by chunk (a chunk holds as many prompts as the largest batch:
first at the first batch size, then the same prompts at the next ...), so load from other
processes on a shared machine hits all alike. Ratios are against the first batch size. The ``--pipeline``
numbers add Ray Data and actor start-up (one model load per pipeline).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ray_fedit.config import GenerationConfig, ModelConfig
from ray_fedit.generation.hf import generate_batch, load_generator_model
from ray_fedit.generation.rows import SamplingParams
from ray_fedit.generation.seeds import load_seed_instructions


def run_core(model, tok, prompts: list[str], batch_size: int,
             sampling: SamplingParams) -> tuple[int, float]:
    """Generated tokens and seconds for answering ``prompts`` in batches of ``batch_size``."""
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        out = generate_batch(model, tok, batch, [0] * len(batch), sampling, "chat")
        tokens += sum(o["num_generated_tokens"] for o in out)
    return tokens, time.perf_counter() - start


def run_pipeline(prompts: list[str], batch_size: int, max_new_tokens: int,
                 threads: int) -> tuple[int, float]:
    from ray_fedit.generation import generate

    gen = GenerationConfig(batch_size=batch_size, max_new_tokens=max_new_tokens,
                           torch_threads=threads)
    start = time.perf_counter()
    out = generate([{"p": p} for p in prompts], prompt_field="p", model_cfg=ModelConfig(),
                   gen_cfg=gen, template="chat")
    return sum(o["num_generated_tokens"] for o in out), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated, e.g. 16,56")
    parser.add_argument("--pipeline", action="store_true", help="also time generate() on Ray")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    torch.set_num_threads(args.threads)
    prompts = [r["instruction"] for r in load_seed_instructions()][: args.prompts]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    model, tok = load_generator_model(ModelConfig(), None, "cpu")
    generate_batch(model, tok, prompts[:2], [0, 0], SamplingParams(4), "chat")  # warm-up

    print(f"SmolLM2-135M, {len(prompts)} prompts, greedy, max_new_tokens={args.max_new_tokens}, "
          f"{args.threads} torch threads")
    totals = {bs: [0, 0.0] for bs in sizes}
    chunk_size = max(sizes)
    for start in range(0, len(prompts), chunk_size):
        chunk = prompts[start:start + chunk_size]
        for bs in sizes:
            tokens, secs = run_core(model, tok, chunk, bs, sampling)
            totals[bs][0] += tokens
            totals[bs][1] += secs
    results = {}
    for bs, (tokens, secs) in totals.items():
        results[bs] = tokens / secs
        print(f"  engine core  batch {bs:>3}: {tokens:5d} tokens in {secs:6.1f} s = "
              f"{results[bs]:6.1f} tokens/s")
    for bs in sizes[1:]:
        print(f"  ratio batch {bs} / batch {sizes[0]}: {results[bs] / results[sizes[0]]:.2f}x")

    if args.pipeline:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        pipe = {}
        for bs in sizes:
            tokens, secs = run_pipeline(prompts, bs, args.max_new_tokens, args.threads)
            pipe[bs] = tokens / secs
            print(f"  Ray pipeline batch {bs:>3}: {tokens:5d} tokens in {secs:6.1f} s = "
                  f"{pipe[bs]:6.1f} tokens/s (incl. actor start and model load)")
        for bs in sizes[1:]:
            print(f"  ratio batch {bs} / batch {sizes[0]}: {pipe[bs] / pipe[sizes[0]]:.2f}x")
        ray.shutdown()


if __name__ == "__main__":
    main()

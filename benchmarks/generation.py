"""Throughput of the ``hf`` engine on the bundled SmolLM2: batch 1 vs 16, same prompts, same run.

Run:
    .venv/bin/python benchmarks/generation.py                # engine core, model loaded once
    .venv/bin/python benchmarks/generation.py --pipeline     # also through Ray Data (generate())

Tokens/s counts generated tokens (up to and including EOS) over wall-clock time. Decoding is greedy
and stops at EOS, as in the data pipelines, so batch 16 also pays for rows that finished early.
The two settings are interleaved chunk by chunk (16 prompts at batch 1, then the same 16 at batch
16, ...), so load from other processes on a shared machine hits both alike. The ``--pipeline``
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
    parser.add_argument("--pipeline", action="store_true", help="also time generate() on Ray")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    torch.set_num_threads(args.threads)
    prompts = [r["instruction"] for r in load_seed_instructions()][: args.prompts]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    model, tok = load_generator_model(ModelConfig(), None, "cpu")
    generate_batch(model, tok, prompts[:2], [0, 0], SamplingParams(4), "chat")  # warm-up

    print(f"SmolLM2-135M, {len(prompts)} prompts, greedy, max_new_tokens={args.max_new_tokens}, "
          f"{args.threads} torch threads")
    totals = {1: [0, 0.0], 16: [0, 0.0]}
    for start in range(0, len(prompts), 16):
        chunk = prompts[start:start + 16]
        for bs in (1, 16):
            tokens, secs = run_core(model, tok, chunk, bs, sampling)
            totals[bs][0] += tokens
            totals[bs][1] += secs
    results = {}
    for bs, (tokens, secs) in totals.items():
        results[bs] = tokens / secs
        print(f"  engine core  batch {bs:>2}: {tokens:5d} tokens in {secs:6.1f} s = "
              f"{results[bs]:6.1f} tokens/s")
    print(f"  ratio batch 16 / batch 1: {results[16] / results[1]:.2f}x")

    if args.pipeline:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        pipe = {}
        for bs in (1, 16):
            tokens, secs = run_pipeline(prompts, bs, args.max_new_tokens, args.threads)
            pipe[bs] = tokens / secs
            print(f"  Ray pipeline batch {bs:>2}: {tokens:5d} tokens in {secs:6.1f} s = "
                  f"{pipe[bs]:6.1f} tokens/s (incl. actor start and model load)")
        print(f"  ratio batch 16 / batch 1: {pipe[16] / pipe[1]:.2f}x")
        ray.shutdown()


if __name__ == "__main__":
    main()

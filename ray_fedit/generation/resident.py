"""One resident ``hf`` generation actor per process and model: load the base model once.

A Ray Data pipeline starts an actor pool per call, and every actor imports torch and transformers
and loads the model again: most of a short call's time. For the single CPU actor layout
(``generation.num_actors: 1``, no GPU, outside a placement group) :func:`run` sends every call of
the process to one long-lived :class:`ResidentGenerator` instead: the data pools, the defense
data's top-up passes and each evaluation. The actor merges the call's LoRA adapter for that call
only (:func:`~ray_fedit.generation.hf.adapter_merged`), so every call sees exactly the loaded base.
Work that reads the model without generating (an evaluation's probe judge and response NLL) goes
there too, through :func:`submit`, instead of a Ray task that would import torch and load the model
once more.

Answers stay bitwise those of the Ray Data path: left padding and the batch shape change the
numerics of a batched forward pass, so the actor answers the very batches Ray Data would form
(:func:`ray_data_batches`) in the same row order, with the same thread count and the same merge.
Other layouts (several actors, GPUs, Tune trials) and the other engines keep Ray Data.

The actor reserves no CPU: it computes only while its caller waits on it, and holding a CPU for
a whole run would keep the trainer workers (or the defense's Ray Train group) from being placed
on a small machine. Ray then gives it ``OMP_NUM_THREADS=1``, as it gives the one-CPU Ray Data
actor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ray_fedit.config import GenerationConfig, ModelConfig
from ray_fedit.data.templates import Template
from ray_fedit.generation.rows import SamplingParams

_ACTORS: dict[tuple[str, str], Any] = {}  # (Ray job id, model config) -> actor handle


# ----------------------------------------------------------------------------- batch composition
def from_items_block_sizes(num_rows: int, num_blocks: int) -> list[int]:
    """Rows per block of ``ray.data.from_items`` of ``num_rows`` items into ``num_blocks``
    blocks: at most one block per row, the first ``num_rows % blocks`` one row longer."""
    blocks = min(num_rows, num_blocks)
    size, extra = divmod(num_rows, blocks)
    return [size + (i < extra) for i in range(blocks)]


def ray_data_batches(num_rows: int, batch_size: int, num_blocks: int) -> list[range]:
    """The row ranges of the batches ``map_batches(batch_size=...)`` hands its callable, for a
    dataset made by ``ray.data.from_items`` of ``num_rows`` items into ``num_blocks`` blocks.

    Ray Data (2.60) bundles whole input blocks until a bundle holds at least ``batch_size`` rows,
    then cuts each bundle into batches of ``batch_size`` rows and one shorter rest. With one row
    per block (up to 200 rows) that is consecutive batches of ``batch_size``; with more rows the
    bundles overshoot and each leaves a short batch. ``tests/ray/test_resident_generation.py``
    checks this against Ray Data itself.
    """
    bundles, pending = [], 0
    for size in from_items_block_sizes(num_rows, num_blocks):
        pending += size
        if pending >= batch_size:
            bundles.append(pending)
            pending = 0
    if pending:
        bundles.append(pending)
    batches, start = [], 0
    for rows in bundles:
        batches += [range(start + i, start + min(i + batch_size, rows))
                    for i in range(0, rows, batch_size)]
        start += rows
    return batches


def from_items_num_blocks() -> int:
    """How many blocks ``ray.data.from_items`` makes outside a placement group: the larger of
    ``DataContext.read_op_min_num_blocks`` (200) and twice the cluster's CPUs."""
    import ray
    import ray.data

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(ray.data.DataContext.get_current().read_op_min_num_blocks, 2 * cpus)


def serves(gen: GenerationConfig) -> bool:
    """Whether a call with these settings goes to the resident actor (see the module docstring)."""
    import ray

    return (gen.engine == "hf" and gen.num_actors == 1 and gen.gpus_per_actor == 0
            and ray.util.get_current_placement_group() is None)


# ---------------------------------------------------------------------------------------- actor
class ResidentGenerator:
    """Holds one base model on the CPU and answers batches under any adapter.

    Args:
        model_cfg: ``ModelConfig.model_dump()`` of the model to load.
        torch_threads: intra-op threads while loading (each call sets its own).
    """

    def __init__(self, model_cfg: dict[str, Any], torch_threads: int) -> None:
        import torch

        from ray_fedit.generation.hf import load_generator_model

        torch.set_num_threads(torch_threads)
        self.model, self.tokenizer = load_generator_model(ModelConfig(**model_cfg), None, "cpu")

    def generate(self, batches: list[list[dict[str, Any]]], template: Template,
                 sampling: dict[str, Any], adapter_dir: str | None,
                 torch_threads: int) -> Iterator[list[dict[str, Any]]]:
        """Answer request rows batch by batch, as ``HFGenerator`` answers Ray Data's batches;
        each batch's answers are yielded as they are done (a streaming actor call), under one
        adapter merge for the whole call."""
        import torch

        from ray_fedit.generation.hf import adapter_merged, generate_batch

        torch.set_num_threads(torch_threads)
        params = SamplingParams(**sampling)
        with adapter_merged(self.model, adapter_dir) as model:
            for batch in batches:
                answers = generate_batch(model, self.tokenizer, [r["prompt"] for r in batch],
                                         [int(r["seed"]) for r in batch], params, template)
                yield [{"_idx": r["_idx"], **a} for r, a in zip(batch, answers, strict=True)]

    def call(self, fn: Callable[..., Any], torch_threads: int, *args: Any) -> Any:
        """``fn(model, tokenizer, *args)`` on the loaded base model, at ``torch_threads``.

        ``fn`` must leave the model as it found it (an adapter goes in through
        :func:`~ray_fedit.generation.hf.adapter_merged`, which restores the exact base weights).
        """
        import torch

        torch.set_num_threads(torch_threads)
        return fn(self.model, self.tokenizer, *args)


def _actor(model_cfg: ModelConfig, torch_threads: int) -> Any:
    import ray

    job = ray.get_runtime_context().get_job_id()
    key = (job, json.dumps(model_cfg.model_dump(mode="json"), sort_keys=True))
    for stale in [k for k in _ACTORS if k[0] != job]:  # made under an earlier ray.init
        del _ACTORS[stale]
    if key not in _ACTORS:
        _ACTORS[key] = ray.remote(num_cpus=0, num_gpus=0)(ResidentGenerator).remote(
            model_cfg.model_dump(), torch_threads)
    return _ACTORS[key]


def run(ordered: list[dict[str, Any]], *, model_cfg: ModelConfig, gen: GenerationConfig,
        template: Template, sampling: SamplingParams, adapter_dir: str | Path | None,
        on_answers: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Answer request rows (already in the Ray Data path's order) on the resident actor.

    ``on_answers(n)`` is called as each batch's ``n`` answers arrive. A dead actor (its process
    killed) is replaced once, and the call repeated on the new one (answers already counted are
    not counted again). A call that fails inside the actor stops it before the error propagates:
    a merge that failed halfway could leave adapter layers in its model, and the next call then
    loads a fresh one.
    """
    batches = [[ordered[i] for i in rows]
               for rows in ray_data_batches(len(ordered), gen.batch_size, from_items_num_blocks())]
    args = (batches, template, sampling.as_dict(),
            None if adapter_dir is None else str(Path(adapter_dir).resolve()), gen.torch_threads)
    counted = 0

    def answer() -> list[dict[str, Any]]:
        nonlocal counted
        import ray

        out: list[dict[str, Any]] = []
        stream = _actor(model_cfg, gen.torch_threads).generate.options(
            num_returns="streaming").remote(*args)
        for ref in stream:
            out += ray.get(ref)
            if on_answers is not None and len(out) > counted:
                on_answers(len(out) - counted)
                counted = len(out)
        return out

    return _once_more_if_dead(answer)


def submit(model_cfg: ModelConfig, torch_threads: int, fn: Callable[..., Any],
           *args: Any) -> Callable[[], Any]:
    """Start ``fn(model, tokenizer, *args)`` in the resident actor of ``model_cfg``, on its loaded
    base model (work that reads the model without generating: a probe's features, an NLL), and
    return a function that waits for its result. The caller works on meanwhile; nothing runs in
    a thread of this process. ``fn`` is a module-level function and must leave the model as it
    found it (see :meth:`ResidentGenerator.call`).

    Failures are handled as in :func:`run` when the result is awaited: an error inside the actor
    stops the actor and propagates; a dead actor is replaced once and the work repeated there,
    unless the actor was stopped here in the meantime (:func:`release`: the run is ending).
    """
    import ray

    actor = _actor(model_cfg, torch_threads)
    ref = actor.call.remote(fn, torch_threads, *args)
    return lambda: _once_more_if_dead(
        lambda: ray.get(ref),
        again=lambda: ray.get(_actor(model_cfg, torch_threads).call.remote(fn, torch_threads,
                                                                           *args)),
        # Released here on purpose (a safeguard: the caller waits before it releases), or
        # replaced by another caller after it died: no second attempt from this waiter.
        abandoned=lambda: actor not in _ACTORS.values())


def _once_more_if_dead(request: Callable[[], Any], *, again: Callable[[], Any] | None = None,
                       abandoned: Callable[[], bool] = lambda: False) -> Any:
    """``request()``, and if the actor died, ``again()`` (default: ``request()``) once on a fresh
    actor, unless ``abandoned()``. An error raised inside the actor stops the actor (a merge that
    failed halfway could leave adapter layers in its model; the next request loads a fresh one)
    before it propagates; so does any failure of the second attempt (a dead handle is not kept
    for the run's next call)."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return request()
    except RayTaskError:
        release()
        raise
    except RayActorError:
        if abandoned():
            raise
        release()
    try:
        return (again or request)()
    except (RayTaskError, RayActorError):
        release()
        raise


def release() -> None:
    """Stop this process's resident actors (they also end with the process that made them)."""
    import ray

    if ray.is_initialized():
        for handle in _ACTORS.values():
            ray.kill(handle, no_restart=True)
    _ACTORS.clear()

"""The trainer worker: a Ray actor that holds the base model once and serves client tasks.

A worker loads the base model and wraps it in LoRA in ``__init__``; every task then loads the global
adapter from the object store into the LoRA parameters, trains the client's local steps with
:mod:`ray_fedit.federation.sft`, and returns ``ClientUpdate(delta, n_examples, stats, state)``. A
worker keeps no client state between tasks except a small cache of tokenized shards (LRU, sized to
the clients it serves per round), so hundreds of clients run on a handful of workers and a client
pinned to a worker (``client_id % num_workers``) is not re-fetched or re-tokenized every round.

Determinism: the task seeds torch's global RNG (LoRA dropout) and the batch order from
``(seed, round, client_id)``, builds a fresh AdamW, and uses the thread count from the config, so a
task gives bitwise the same delta on any worker, on a restarted worker, and after a resume.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import ray
import torch

from ray_fedit.config import RunConfig
from ray_fedit.data.schema import Record
from ray_fedit.federation.checkpoint import render_adapter_config
from ray_fedit.federation.sampling import (
    NO_CLIENT,
    derive_seed,
    numpy_generator,
    openfedllm_subsample,
)
from ray_fedit.federation.sft import (
    ParamView,
    TokenizedExample,
    TrainConfig,
    batch_order,
    tokenize_records,
    train_steps,
)
from ray_fedit.federation.state import ClientTask, ClientUpdate
from ray_fedit.models.codec import AdapterCodec
from ray_fedit.models.loading import load_model_and_tokenizer
from ray_fedit.models.lora import adapter_state, wrap_lora


def worker_device(cfg: RunConfig) -> torch.device:
    """CUDA when the worker was given GPUs and this process can see one, else CPU."""
    if cfg.resources.gpus_per_worker > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _text_bytes(records: list[Record]) -> int:
    return sum(len(r["instruction"].encode()) + len(r["response"].encode()) for r in records)


@ray.remote
class TrainerWorker:
    """Serves client tasks on one base model (see the module docstring).

    Args:
        cfg: the run's config (model, lora, data, federation, resources, seed).
        worker_index: this worker's index in the pool (reported in task stats).
    """

    def __init__(self, cfg: RunConfig, worker_index: int) -> None:
        self.cfg = cfg
        self.index = worker_index
        self._set_threads()
        # cuBLAS is deterministic only with a fixed workspace, set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few kernels (mostly CUDA) have no deterministic variant; warn, not fail.
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = worker_device(cfg)
        model, self.tokenizer = load_model_and_tokenizer(cfg.model, self.device)
        # Every worker draws the same initial LoRA A, so any of them can provide round 0's adapter.
        torch.manual_seed(derive_seed(cfg.seed, 0, NO_CLIENT, "lora_init"))
        self.model = wrap_lora(model, cfg.lora)
        self.codec = AdapterCodec.from_state_dict(adapter_state(self.model))
        self.view = ParamView(self.model, self.codec)
        fed = cfg.federation
        self._cache_size = max(1, math.ceil(fed.clients_per_round / cfg.resources.num_workers))
        self._shards: OrderedDict[int, tuple[list[TokenizedExample], int]] = OrderedDict()

    def _set_threads(self) -> None:
        torch.set_num_threads(self.cfg.resources.torch_threads)

    def ping(self) -> int:
        """This worker's pid: answers once the model is loaded (after a restart, too)."""
        return os.getpid()

    def clear_shards(self) -> None:
        """Drop the cached tokenized shards (the pool is about to serve another federation)."""
        self._shards.clear()

    def describe(self) -> dict[str, Any]:
        """The worker's pid, device, adapter layout, initial (round-0) adapter and PEFT config."""
        return {"pid": os.getpid(), "device": str(self.device), "index": self.index,
                "codec": self.codec.to_json(), "initial": self.view.get_flat(),
                "adapter_config": render_adapter_config(self.cfg.lora, self.cfg.model.name)}

    def _examples(self, client_id: int,
                  shard_box: list[Any]) -> tuple[list[TokenizedExample], int, int]:
        """The client's tokenized shard (cached), its size, and the bytes fetched to get it."""
        if client_id in self._shards:
            self._shards.move_to_end(client_id)
            examples, size = self._shards[client_id]
            return examples, size, 0
        shard = shard_box[0]
        records = ray.get(shard) if isinstance(shard, ray.ObjectRef) else shard
        examples = tokenize_records(self.tokenizer, records, template=self.cfg.data.template,
                                    max_seq_len=self.cfg.data.max_seq_len)
        self._shards[client_id] = (examples, len(records))
        while len(self._shards) > self._cache_size:
            self._shards.popitem(last=False)
        return examples, len(records), _text_bytes(records)

    def train_client(
        self,
        task: ClientTask,
        global_vector: np.ndarray,
        shard_box: list[Any],
        state: np.ndarray | None = None,
        control: np.ndarray | None = None,
    ) -> ClientUpdate:
        """Train one client's local steps from the global adapter.

        Args:
            task: client id, round, learning rate.
            global_vector: the global adapter (flat fp32; Ray resolves the round's ObjectRef).
            shard_box: ``[ObjectRef or records]``; boxed so Ray does not fetch the shard when the
                tokenized shard is cached here.
            state: SCAFFOLD's client control variate ``c_i`` (None for other algorithms).
            control: SCAFFOLD's server control variate ``c``.

        Returns:
            ``ClientUpdate(delta, n_examples, stats, new_state)``.
        """
        t0 = time.perf_counter()
        cfg, fed = self.cfg, self.cfg.federation
        self._set_threads()
        cid, rnd = task.client_id, task.round_index
        torch.manual_seed(derive_seed(cfg.seed, rnd, cid, "dropout"))
        examples, shard_size, shard_bytes = self._examples(cid, shard_box)
        if fed.compat == "openfedllm":
            needed = fed.local_steps * fed.batch_size * fed.grad_accum
            examples = [examples[i] for i in openfedllm_subsample(len(examples), needed, rnd)]
        order = batch_order(len(examples), fed.local_steps, fed.batch_size, fed.grad_accum,
                            numpy_generator(cfg.seed, rnd, cid, "batches"))
        self.view.set_flat(global_vector)
        anchor = correction = None
        if fed.algorithm == "fedprox":
            anchor = self.view.split(global_vector, self.device)
        if fed.algorithm == "scaffold":
            correction = self.view.split(control - state, self.device)
        train_cfg = TrainConfig(steps=fed.local_steps, batch_size=fed.batch_size,
                                grad_accum=fed.grad_accum, lr=task.lr,
                                weight_decay=fed.weight_decay, max_grad_norm=fed.max_grad_norm,
                                prox_mu=fed.prox_mu if fed.algorithm == "fedprox" else 0.0)
        stats = train_steps(self.model, self.view.params, examples, order, train_cfg,
                            pad_id=self.tokenizer.pad_token_id, anchor=anchor,
                            correction=correction)
        delta = self.view.get_flat() - np.asarray(global_vector, dtype=np.float32)
        new_state = None
        if fed.algorithm == "scaffold":
            # SCAFFOLD option II (Karimireddy et al. 2020): c_i+ = c_i - c + (x - y) / (K * lr).
            k_lr = np.float32(max(1, fed.local_steps - stats.empty_steps) * task.lr)
            new_state = (state - control - delta / k_lr).astype(np.float32)
        dim_bytes = 4 * self.codec.dim
        moved = 2 * dim_bytes + shard_bytes + (3 * dim_bytes if new_state is not None else 0)
        info = {**stats.to_dict(), "shard_size": shard_size, "shard_bytes": shard_bytes,
                "bytes": moved, "worker": self.index, "pid": os.getpid(), "attempt": task.attempt,
                "seconds": time.perf_counter() - t0}
        return ClientUpdate(delta.astype(np.float32), fed.local_steps * fed.batch_size
                            * fed.grad_accum, info, new_state)

"""Client sampling, seed derivation and worker assignment.

Pure functions without Ray. Every random draw in a run comes from a generator derived from
``(seed, round, client_id, purpose)`` by :func:`derive_seed`, never from a global RNG, so a round
can be replayed on any worker, after a failure or after a resume, and give the same numbers.

Sampling modes:

- ``uniform``: ``clients_per_round`` distinct clients drawn from a numpy Generator seeded by
  ``(seed, round)``.
- ``stratified``: the same, but exactly ``round_half_up(clients_per_round * malicious_share)`` of
  them malicious, so a short demo sees the configured attacker share every round.
- ``openfedllm`` (``federation.compat: openfedllm``): the paper's code, ``random.seed(round);
  random.sample(range(num_clients), clients_per_round)`` (OpenFedLLM ``get_clients_this_round``).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Literal

import numpy as np

SamplingMode = Literal["uniform", "stratified", "openfedllm"]

# Purposes of derived generators. Client-independent draws use NO_CLIENT in the client slot.
NO_CLIENT = -1


def _purpose_tag(purpose: str) -> int:
    # hashlib, not hash(): Python's str hash is salted per process, and workers are processes.
    return int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4], "little")


def derive_seed(seed: int, round_index: int, client_id: int, purpose: str) -> int:
    """A 63-bit seed for one purpose of one client in one round.

    Args:
        seed: the run's seed (``cfg.seed``).
        round_index: 0-based round.
        client_id: the client, or ``NO_CLIENT`` for draws that belong to the round.
        purpose: what the generator is for (``"batches"``, ``"dropout"``, ``"sampling"``, ...);
            different purposes give independent streams.

    Returns:
        A non-negative int below 2**63, usable by numpy and ``torch.manual_seed``.
    """
    entropy = [seed % 2**32, seed // 2**32 % 2**32, round_index, client_id + 1,
               _purpose_tag(purpose)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def numpy_generator(seed: int, round_index: int, client_id: int,
                    purpose: str) -> np.random.Generator:
    """A numpy Generator for ``(seed, round, client, purpose)``."""
    return np.random.default_rng(derive_seed(seed, round_index, client_id, purpose))


def round_half_up(x: float) -> int:
    """Round half up (``round`` in Python rounds half to even: round(2.5) == 2)."""
    return int(math.floor(x + 0.5 + 1e-9))


def sample_clients(
    *,
    seed: int,
    round_index: int,
    num_clients: int,
    clients_per_round: int,
    mode: SamplingMode,
    malicious_ids: Sequence[int] = (),
) -> list[int]:
    """The sorted ids of the clients that train in ``round_index``.

    Args:
        seed: the run's seed (unused by ``openfedllm``, which seeds with the round alone).
        round_index: 0-based round.
        num_clients: registered clients.
        clients_per_round: clients sampled per round (all of them when >= num_clients).
        mode: ``uniform``, ``stratified`` or ``openfedllm`` (see the module docstring).
        malicious_ids: the malicious clients (used by ``stratified``).

    Returns:
        Sorted, distinct client ids.
    """
    if clients_per_round >= num_clients:
        return list(range(num_clients))
    if mode == "openfedllm":
        # random.Random(r) is seeded exactly like random.seed(r), without touching global state.
        return sorted(random.Random(round_index).sample(range(num_clients), clients_per_round))
    rng = numpy_generator(seed, round_index, NO_CLIENT, "sampling")
    if mode == "uniform":
        picks = rng.choice(num_clients, size=clients_per_round, replace=False)
        return sorted(int(c) for c in picks)
    malicious = sorted(set(malicious_ids))
    benign = [c for c in range(num_clients) if c not in set(malicious)]
    k_mal = stratified_malicious_count(num_clients, clients_per_round, len(malicious))
    picked = list(rng.choice(malicious, size=k_mal, replace=False)) if k_mal else []
    picked += list(rng.choice(benign, size=clients_per_round - k_mal, replace=False))
    return sorted(int(c) for c in picked)


def stratified_malicious_count(num_clients: int, clients_per_round: int, num_malicious: int) -> int:
    """Malicious clients in every round under ``stratified`` sampling.

    ``round_half_up(clients_per_round * num_malicious / num_clients)``, capped by the malicious
    clients there are, and raised when there are too few benign clients to fill the rest.
    """
    k = min(round_half_up(clients_per_round * num_malicious / num_clients), num_malicious)
    return max(k, clients_per_round - (num_clients - num_malicious))


def malicious_per_round(mode: SamplingMode, num_clients: int, clients_per_round: int,
                        num_malicious: int) -> tuple[int, int]:
    """The fewest and the most malicious clients one round can sample under ``mode``.

    Used at config load to decide whether an update attack can ever find its reference updates.
    """
    cpr = min(clients_per_round, num_clients)
    if mode == "stratified" or cpr == num_clients:
        k = num_malicious if cpr == num_clients else stratified_malicious_count(
            num_clients, cpr, num_malicious)
        return k, k
    return max(0, cpr - (num_clients - num_malicious)), min(cpr, num_malicious)


def openfedllm_subsample(num_examples: int, num_needed: int, round_index: int) -> list[int]:
    """Indices of the examples a client trains on this round in OpenFedLLM compat mode.

    The paper's ``get_dataset_this_round``: ``random.seed(round); random.sample(range(len(ds)),
    min(batch * accum * steps, len(ds)))``; every client uses the same seed (the round).
    """
    k = min(num_needed, num_examples)
    return random.Random(round_index).sample(range(num_examples), k)


def assign_workers(client_ids: Sequence[int], num_workers: int) -> dict[int, int]:
    """Map each sampled client to a worker index, preferring ``client_id % num_workers``.

    Affinity keeps a client on the same worker across rounds (its tokenized shard stays cached
    there; with as many workers as clients, each client is pinned to its own worker). No worker gets
    more than ``ceil(len(client_ids) / num_workers)`` clients, so an unlucky sample cannot leave one
    worker doing most of the round: overflow clients go to the least-loaded worker (lowest index on
    ties). The result depends only on the arguments, never on timing.
    """
    cap = math.ceil(len(client_ids) / num_workers) if client_ids else 0
    load = [0] * num_workers
    out: dict[int, int] = {}
    overflow = []
    for c in sorted(client_ids):
        w = c % num_workers
        if load[w] < cap:
            out[c] = w
            load[w] += 1
        else:
            overflow.append(c)
    for c in overflow:
        w = min(range(num_workers), key=lambda i: (load[i], i))
        out[c] = w
        load[w] += 1
    return out

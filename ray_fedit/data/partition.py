"""Client partitioning: which records each client holds. Pure functions over index arrays.

- ``iid``: shuffle, then cut into near-equal shards (the paper's ``dataset.shard``).
- ``dirichlet``: per label (source or category), split its items over clients with proportions drawn
  from Dir(alpha) (Hsu et al. 2019); small alpha gives skewed, non-iid clients.
- ``by_source``: the paper's threat model: benign clients draw from the benign pools, malicious clients
  from the attack pool (see :func:`build_clients`, which also keeps the benign clients' records the
  same with and without attackers, for the paired no-attack federation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ray_fedit.data.schema import Record
from ray_fedit.errors import DataError


def partition_iid(n_items: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``range(n_items)`` and cut it into ``num_clients`` shards differing by at most one."""
    if n_items < num_clients:
        raise DataError(f"cannot give {num_clients} clients at least one item each from "
                        f"{n_items} items")
    return [np.sort(s) for s in np.array_split(rng.permutation(n_items), num_clients)]


def partition_dirichlet(labels: Sequence[str], num_clients: int, alpha: float,
                        rng: np.random.Generator, max_tries: int = 100) -> list[np.ndarray]:
    """Split items over clients label by label with Dir(alpha) proportions; no client is empty.

    Raises:
        DataError: if no draw in ``max_tries`` leaves every client non-empty (alpha too small for
            this many clients and items).
    """
    labels_arr = np.asarray(labels)
    classes = sorted(set(labels_arr.tolist()))
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels_arr == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts[:-1])):
                shards[k].extend(part.tolist())
        if all(shards):
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise DataError(f"dirichlet partition with alpha={alpha} left a client empty in {max_tries} "
                    f"draws ({len(labels_arr)} items, {num_clients} clients); raise "
                    "data.dirichlet_alpha or add data")


def choose_malicious(num_clients: int, num_malicious: int, rng: np.random.Generator) -> list[int]:
    """The malicious client ids, drawn once per run and recorded in the manifest."""
    return sorted(rng.choice(num_clients, size=num_malicious, replace=False).tolist())


def _take(pool: Sequence[Record], idx: np.ndarray, k: int, rng: np.random.Generator) -> list[Record]:
    """``k`` records from ``pool[idx]``, without replacement while the shard lasts."""
    if k == 0:
        return []
    if len(idx) == 0:
        raise DataError("a client's shard of a data pool is empty; add data or lower "
                        "data.samples_per_client")
    picks = rng.permutation(idx)[:k] if k <= len(idx) else rng.choice(idx, size=k, replace=True)
    return [pool[i] for i in picks]


def build_clients(
    *,
    normal: Sequence[Record],
    aligned: Sequence[Record],
    attack: Sequence[Record],
    num_clients: int,
    malicious_ids: Sequence[int],
    samples_per_client: int,
    aligned_fraction: float,
    partition: str,
    dirichlet_alpha: float,
    seed: int,
) -> list[list[Record]]:
    """Each client's records.

    Benign clients hold ``samples_per_client`` records, ``aligned_fraction`` of them aligned pairs
    (harmful -> refusal) and the rest normal data; the normal and aligned pools are split across
    all ``num_clients`` clients by ``partition`` (iid or dirichlet over ``source``; ``by_source`` =
    iid within each pool). Malicious clients hold unaligned pairs from an iid split of the attack
    pool instead of their benign shards.

    The split of the benign pools and each client's draw from its shard come from generators
    derived from ``seed`` (and the client id) alone, never from ``malicious_ids``: called again
    with ``malicious_ids=[]`` (the paired no-attack federation), every client that is benign in
    both calls gets exactly the same records, and the attacked run's malicious clients hold the
    benign data their shards give them.

    Raises:
        DataError: an empty pool that a client needs (aligned pairs with ``aligned_fraction > 0``,
            attack pairs with malicious clients), or shards too small to split.
    """
    malicious = set(malicious_ids)
    if aligned_fraction > 0 and not aligned:
        raise DataError(f"data.aligned_fraction={aligned_fraction} gives every benign client "
                        "aligned pairs, but the aligned pool is empty; add data.aligned sources "
                        "or set data.aligned_fraction=0")
    if malicious and not attack:
        raise DataError(f"{len(malicious)} malicious clients but the attack pool is empty")
    n_aligned = round(samples_per_client * aligned_fraction)
    everyone = list(range(num_clients))

    def split(pool: Sequence[Record], ids: list[int], purpose: int) -> dict[int, np.ndarray]:
        if not ids or not pool:
            return {c: np.arange(0) for c in ids}
        rng = np.random.default_rng([seed, 7, purpose])
        if partition == "dirichlet":
            shards = partition_dirichlet([r["source"] for r in pool], len(ids), dirichlet_alpha, rng)
        else:
            shards = partition_iid(len(pool), len(ids), rng)
        return dict(zip(ids, shards, strict=True))

    normal_shards, aligned_shards = split(normal, everyone, 1), split(aligned, everyone, 2)
    attack_shards = split(attack, sorted(malicious), 3)
    clients: list[list[Record]] = []
    for c in everyone:
        rng = np.random.default_rng([seed, 7, 4, c])
        if c in malicious:
            clients.append(_take(attack, attack_shards[c], samples_per_client, rng))
        else:
            recs = (_take(aligned, aligned_shards[c], n_aligned, rng)
                    + _take(normal, normal_shards[c], samples_per_client - n_aligned, rng))
            clients.append([recs[i] for i in rng.permutation(len(recs))])
    return clients

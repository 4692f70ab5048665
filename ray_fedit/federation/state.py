"""Plain data of the federation: client specs, client updates, the run state, the result.

No Ray here: a ``ClientSpec.shard`` may hold a Ray ``ObjectRef`` but is typed ``Any``, so the module
imports without Ray and unit tests build these objects directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ray_fedit.federation.rule_state import RuleState
from ray_fedit.federation.server_opt import ServerOptState
from ray_fedit.models.codec import AdapterCodec


@dataclass(frozen=True)
class ClientSpec:
    """A client is data, not an actor.

    Attributes:
        client_id: 0-based id; the ids of a run are exactly ``range(federation.num_clients)``.
        shard: the client's records: a Ray ObjectRef to a list of records, or the list itself
            (``run_federation`` puts lists into the object store once).
        is_malicious: whether update-space attacks act on this client's delta.
        state: optional initial persistent state (SCAFFOLD's control variate ``c_i`` as a flat fp32
            array of the adapter's length, or an ObjectRef to one); zeros when None.
    """

    client_id: int
    shard: Any
    is_malicious: bool = False
    state: Any = None


@dataclass(frozen=True)
class ClientTask:
    """One client's work in one round, as sent to a trainer worker.

    Attributes:
        client_id: the client.
        round_index: 0-based round (seeds the client's generators with the run's seed).
        lr: this round's learning rate.
        attempt: 0 for the first try, then 1, 2, ... for retries (recorded, never seeded from).
    """

    client_id: int
    round_index: int
    lr: float
    attempt: int = 0


class ClientUpdate(NamedTuple):
    """What a client task returns: ``(delta, n_examples, stats, state)``.

    ``delta`` is ``local adapter - global adapter`` as a flat fp32 vector; ``n_examples`` the
    example slots trained this round (``steps * batch_size * grad_accum``); ``stats`` JSON-able
    numbers (loss, tokens, seconds, shard size, ...); ``state`` the client's new persistent state
    (SCAFFOLD ``c_i``) or None.
    """

    delta: np.ndarray
    n_examples: int
    stats: dict[str, Any]
    state: np.ndarray | None = None


@dataclass
class FederationState:
    """Everything a checkpoint holds, and everything a resumed run needs.

    Attributes:
        rounds_done: rounds completed (the next round's 0-based index).
        global_vector: the global adapter, flat fp32.
        server: the server optimizer's arrays and step count.
        control: SCAFFOLD's server control variate ``c`` (None for other algorithms).
        client_state: client id -> ``{"round": r, "sha256": h}`` of its latest state file.
        metrics: the per-round records so far (the lines of rounds.jsonl).
        rule: the aggregation rule's state (centered clipping's center, FoolsGold's history).
    """

    rounds_done: int
    global_vector: np.ndarray
    server: ServerOptState
    control: np.ndarray | None = None
    client_state: dict[int, dict[str, Any]] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    rule: RuleState = field(default_factory=RuleState)


@dataclass
class FederationResult:
    """What ``run_federation`` returns.

    Attributes:
        run_dir: the run directory.
        adapter_dir: the final global adapter in PEFT format (``<run_dir>/checkpoints/final``);
            written only when the run finished (``finished``).
        global_vector: the global adapter after the last completed round, flat fp32.
        codec: the adapter layout (``codec.unflatten(global_vector)`` is a PEFT state dict).
        rounds: one record per completed round (the lines of ``rounds.jsonl``).
        rounds_completed: how many rounds are done.
        finished: False when the run stopped early (``stop_after``); resume it to continue.
        resumed_from: the rounds already done in the checkpoint this run resumed from, else None.
        malicious_ids: the clients marked malicious.
        seconds: wall time of this call.
        worker_pids: the process ids of the trainer workers that served it.
    """

    run_dir: Path
    adapter_dir: Path | None
    global_vector: np.ndarray
    codec: AdapterCodec
    rounds: list[dict[str, Any]]
    rounds_completed: int
    finished: bool
    resumed_from: int | None
    malicious_ids: list[int]
    seconds: float
    worker_pids: list[int] = field(default_factory=list)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The final global adapter as a PEFT state dict."""
        return self.codec.unflatten(self.global_vector)

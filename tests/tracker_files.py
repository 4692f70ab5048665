"""Read back what the trackers wrote, with each backend's own reader.

TensorBoard: its event accumulator. MLflow: its client against the file store. W&B: the offline
``.wandb`` file holds W&B's own protobuf ``Record`` messages in LevelDB's log framing (7-byte
header, 32 KiB blocks, records split FULL/FIRST/MIDDLE/LAST); W&B 0.31 ships no Python reader for
it, so the framing is undone here and every record is parsed with W&B's ``Record`` class.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_texts(logdir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return list(acc.Tags()["tensors"])


def mlflow_run(mlruns: Path) -> tuple[Any, Any]:
    """The only run in the file store under ``mlruns``, and a client for it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlruns.resolve().as_uri())
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1, runs
    return runs[0], client


def mlflow_history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_payloads(data: bytes):
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        payload = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            parts = [payload]
        elif kind == _MIDDLE:
            parts.append(payload)
        elif kind == _LAST:
            yield b"".join([*parts, payload])


def wandb_offline(wandb_dir: Path) -> dict[str, Any]:
    """``{"history": [rows], "config": {key: value}, "artifacts": [names]}`` of the only offline
    run under ``wandb_dir``."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out: dict[str, Any] = {"history": [], "config": {}, "artifacts": []}
    for payload in _wandb_payloads(files[0].read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            out["artifacts"].append((record.artifact.name,
                                     sorted(e.path for e in record.artifact.manifest.contents)))
    return out

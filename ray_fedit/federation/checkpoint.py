"""Atomic, verified checkpoints of a federation run, and the per-client state store.

Layout under the run directory::

    checkpoints/round_0004/            after 4 completed rounds
      adapter_config.json              the global adapter in PEFT format (PeftModel.from_pretrained)
      adapter_model.safetensors
      server_state.safetensors         server optimizer arrays (m, v), SCAFFOLD's control c and
                                       the aggregation rule's state (rule.center, rule.history.*)
      state.json                       rounds done, config hash, codec layout + fingerprint, RNG
                                       scheme, client-state index, metrics so far, file hashes,
                                       and a content hash over all of it
    checkpoints/final/                 the final global adapter (PEFT format) + federation.json
    client_state/c000123_r00007.npy    a client's state (SCAFFOLD c_i) written in round 7

A checkpoint is written into a temporary directory and renamed into place, so a crash leaves either
the old checkpoint or the new one, never half of one. Loading verifies every file's SHA-256 and
the content hash, and refuses a checkpoint written under another config (``rundir.config_hash``) or
for another adapter layout (codec fingerprint). Only JSON, safetensors and ``.npy``
(``allow_pickle=False``) are read: nothing is ever unpickled.

Client state files are immutable, one per (client, round written); the index in the run state names
the current one per client. Files that neither the live index nor the latest checkpoint references
are pruned, so disk use follows the clients that have state, and a resume never sees state written
after its checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from ray_fedit.config import LoraConfig
from ray_fedit.errors import CheckpointError
from ray_fedit.federation.rule_state import RuleState
from ray_fedit.federation.server_opt import ServerOptState
from ray_fedit.federation.state import FederationState
from ray_fedit.models.codec import AdapterCodec
from ray_fedit.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter

FORMAT_VERSION = 1
STATE_FILE = "state.json"
SERVER_FILE = "server_state.safetensors"
FINAL_DIR = "final"
RNG_SCHEME = "stateless: derive_seed(seed, round, client_id, purpose) via numpy SeedSequence"
_ROUND_DIR = re.compile(r"^round_(\d{4,})$")


def render_adapter_config(lora: LoraConfig, base_model: str) -> str:
    """The ``adapter_config.json`` text PEFT writes for this LoRA section (imports peft).

    Trainer workers render it once (they import peft anyway); the driver then writes adapters
    with :func:`write_adapter` without importing peft and transformers (~4 s of CPU per run).
    """
    from ray_fedit.models.lora import adapter_config_text

    return adapter_config_text(lora, base_model)


def write_adapter(directory: Path, vector: np.ndarray, *, codec: AdapterCodec,
                  adapter_config: str) -> Path:
    """Write a flat adapter in PEFT format: the same two files as ``models.lora.save_adapter``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(adapter_config)
    state = {k: v.contiguous() for k, v in codec.unflatten(vector).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def checkpoint_dir(root: Path, rounds_done: int) -> Path:
    """``<root>/round_0004`` for a checkpoint after 4 completed rounds."""
    return root / f"round_{rounds_done:04d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _content_hash(body: Mapping[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in body.items() if k != "content_hash"}, sort_keys=True,
                           separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target`` (replacing an older ``target`` without a window of neither)."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    root: Path,
    state: FederationState,
    *,
    config_hash: str,
    codec: AdapterCodec,
    adapter_config: str,
    seed: int,
) -> Path:
    """Write ``state`` as ``<root>/round_XXXX`` atomically and return that path."""
    root.mkdir(parents=True, exist_ok=True)
    target = checkpoint_dir(root, state.rounds_done)
    tmp = root / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        write_adapter(tmp, state.global_vector, codec=codec, adapter_config=adapter_config)
        arrays = {f"server.{k}": np.ascontiguousarray(v) for k, v in state.server.arrays.items()}
        if state.control is not None:
            arrays["control"] = np.ascontiguousarray(state.control)
        arrays.update(state.rule.to_arrays())
        save_numpy(arrays, str(tmp / SERVER_FILE))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        body: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "rounds_done": state.rounds_done,
            "config_hash": config_hash,
            "codec": codec.to_json(),
            "codec_fingerprint": codec.fingerprint(),
            "server_steps": state.server.steps,
            "client_state": {str(c): e for c, e in sorted(state.client_state.items())},
            "rng": {"scheme": RNG_SCHEME, "seed": seed},
            "metrics": state.metrics,
            "files": files,
        }
        body["content_hash"] = _content_hash(body)
        (tmp / STATE_FILE).write_text(json.dumps(body, indent=1, sort_keys=True))
        for p in tmp.iterdir():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_latest(root: Path) -> Path | None:
    """The checkpoint with the most completed rounds under ``root`` (temp dirs ignored), or None."""
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _ROUND_DIR.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def read_checkpoint(path: Path, *, config_hash: str) -> dict[str, Any]:
    """Verify a checkpoint's integrity and config; return its ``state.json`` body.

    Raises:
        CheckpointError: if ``state.json`` is missing or unreadable, a file is missing or its hash
            differs (corruption), the content hash differs, the format is unknown, or the
            checkpoint was written under a different config.
    """
    state_file = path / STATE_FILE
    try:
        body = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE} ({e}); the checkpoint "
                              "is incomplete or corrupted: delete it to resume from an older one, "
                              "or start a new run directory") from None
    if body.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format {body.get('format')!r}, this code reads "
                              f"format {FORMAT_VERSION}")
    if body.get("content_hash") != _content_hash(body):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} does not match its content hash "
                              "(edited or corrupted); delete the checkpoint or start a new run")
    for name, digest in body["files"].items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path}: file {name} is missing or its SHA-256 "
                                  "differs from state.json (corrupted); delete the checkpoint to "
                                  "resume from an older one, or start a new run directory")
    if body["config_hash"] != config_hash:
        raise CheckpointError(f"checkpoint {path} was written by a run with config hash "
                              f"{body['config_hash']}, this run's config hashes to {config_hash}; "
                              "resume with the run's resolved_config.yaml, or use a new run "
                              "directory for a different config")
    return body


def load_checkpoint(path: Path, body: Mapping[str, Any], codec: AdapterCodec) -> FederationState:
    """The run state stored in a checkpoint that :func:`read_checkpoint` verified.

    Raises:
        CheckpointError: if the checkpoint's adapter layout differs from ``codec`` (another model or
            LoRA shape).
    """
    if body["codec_fingerprint"] != codec.fingerprint():
        raise CheckpointError(f"checkpoint {path} holds an adapter with layout "
                              f"{body['codec_fingerprint']}, the model here has "
                              f"{codec.fingerprint()} (different model or LoRA settings); use the "
                              "run's config")
    adapter, _ = load_adapter(path)
    arrays = load_numpy(str(path / SERVER_FILE))
    server = ServerOptState(
        arrays={k.removeprefix("server."): v for k, v in arrays.items() if k.startswith("server.")},
        steps=int(body["server_steps"]),
    )
    return FederationState(
        rounds_done=int(body["rounds_done"]),
        global_vector=codec.flatten(adapter),
        server=server,
        control=arrays.get("control"),
        client_state={int(c): dict(e) for c, e in body["client_state"].items()},
        metrics=list(body["metrics"]),
        rule=RuleState.from_arrays(arrays),
    )


def save_final(root: Path, vector: np.ndarray, *, codec: AdapterCodec, adapter_config: str,
               summary: Mapping[str, Any]) -> Path:
    """Write the final global adapter (PEFT format) to ``<root>/final`` atomically."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{FINAL_DIR}-{uuid.uuid4().hex[:8]}"
    try:
        write_adapter(tmp, vector, codec=codec, adapter_config=adapter_config)
        (tmp / "federation.json").write_text(json.dumps(dict(summary), indent=1, sort_keys=True))
        _replace_dir(tmp, root / FINAL_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / FINAL_DIR


def remove_temp_dirs(root: Path) -> None:
    """Delete temporary directories a crashed save left behind."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


class ClientStateStore:
    """Per-client persistent state (SCAFFOLD ``c_i``) as immutable ``.npy`` files on disk.

    Memory holds only the states of the clients sampled in the current round.

    Args:
        root: the folder (``<run_dir>/client_state``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, client_id: int, round_index: int) -> Path:
        return self.root / f"c{client_id:06d}_r{round_index:05d}.npy"

    def save(self, client_id: int, round_index: int, array: np.ndarray) -> dict[str, Any]:
        """Write a client's state from ``round_index``; return its index entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
        data = buf.getvalue()
        target = self.path(client_id, round_index)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        tmp.replace(target)
        return {"round": round_index, "sha256": hashlib.sha256(data).hexdigest()}

    def load(self, client_id: int, entry: Mapping[str, Any]) -> np.ndarray:
        """Read the state file an index entry names, verifying its hash.

        Raises:
            CheckpointError: if the file is missing or its content differs from the index.
        """
        target = self.path(client_id, int(entry["round"]))
        try:
            data = target.read_bytes()
        except OSError as e:
            raise CheckpointError(f"client {client_id}'s state file {target} is missing ({e}); "
                                  "the run directory is incomplete") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"client {client_id}'s state file {target} differs from the "
                                  "hash recorded in the run state (corrupted)")
        return np.load(io.BytesIO(data), allow_pickle=False)

    def prune(self, *indexes: Mapping[int, Mapping[str, Any]]) -> int:
        """Delete state files no index references; return how many were deleted."""
        if not self.root.is_dir():
            return 0
        keep = {self.path(c, int(e["round"])).name for index in indexes for c, e in index.items()}
        removed = 0
        for p in self.root.iterdir():
            if p.suffix == ".npy" and p.name not in keep:
                p.unlink(missing_ok=True)
                removed += 1
        return removed


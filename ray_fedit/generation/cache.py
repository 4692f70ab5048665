"""Generated datasets on disk: Parquet with provenance, keyed by the hash of what made them.

A dataset lives at ``<dir>/<kind>-<key>.parquet`` where ``key`` is the first 16 hex digits of the
SHA-256 of the canonical JSON of its *spec*: every setting that affects the output (generator,
template, sampling, seeds, counts, sources and their versions, adapter hash, prompts, pipeline
version). Rows are the record schema (:func:`ray_fedit.data.schema.to_table`); the Parquet schema
metadata holds ``{"provenance": ..., "stats": ...}``, including ``content_sha256``, the hash of
the rows, which is checked on every read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray_fedit.data.schema import Record, from_rows, to_table

META_KEY = b"ray_fedit"


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, non-JSON values as ``str``: equal data gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_key(spec: dict[str, Any]) -> str:
    """The cache key of a spec: 16 hex digits of SHA-256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


def content_hash(records: Iterable[Record]) -> str:
    """SHA-256 of the records' canonical JSON (order matters)."""
    h = hashlib.sha256()
    for r in records:
        h.update(canonical_json(r).encode())
        h.update(b"\n")
    return h.hexdigest()


def files_hash(paths: Iterable[Path]) -> str:
    """SHA-256 over the names and bytes of files (e.g. an adapter directory's files)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def write_dataset(path: Path, records: list[Record], provenance: dict[str, Any],
                  stats: dict[str, Any]) -> None:
    """Write records + metadata atomically (a reader never sees a half-written file)."""
    import pyarrow.parquet as pq

    table = to_table(records)
    table = table.replace_schema_metadata(
        {META_KEY: canonical_json({"provenance": provenance, "stats": stats}).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_dataset(path: Path) -> tuple[list[Record], dict[str, Any], dict[str, Any]] | None:
    """``(records, provenance, stats)`` of a cached dataset, or None if it is missing or corrupt.

    A file whose rows no longer match its ``content_sha256`` counts as corrupt.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid):
        return None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        return None
    meta = json.loads(raw)
    records = from_rows(table.to_pylist())
    if content_hash(records) != meta["provenance"].get("content_sha256"):
        return None
    return records, meta["provenance"], meta["stats"]

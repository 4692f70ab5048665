"""The one record schema every loader produces and every consumer reads.

A record is a plain dict (cheap to ship through Ray and to write as Arrow/Parquet):

    instruction (str)   the user turn
    response (str)      the assistant turn ("" for prompt-only data such as safety benchmarks)
    source (str)        where it came from ("advbench", "generated:attack", a file name, ...)
    is_harmful (bool)   whether the instruction asks for harmful content
    meta (dict)         anything else (category, generator, id); stored as JSON text in Parquet
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from ray_fedit.errors import DataError

FIELDS = ("instruction", "response", "source", "is_harmful", "meta")


class Record(TypedDict):
    instruction: str
    response: str
    source: str
    is_harmful: bool
    meta: dict[str, Any]


def make_record(instruction: str, response: str = "", *, source: str, is_harmful: bool = False,
                meta: Mapping[str, Any] | None = None) -> Record:
    return Record(instruction=instruction, response=response, source=source,
                  is_harmful=bool(is_harmful), meta=dict(meta or {}))


def check_record(rec: Mapping[str, Any], where: str) -> Record:
    """Validate one record's fields and types.

    Raises:
        DataError: naming ``where`` (file:line), the field and the problem.
    """
    for f in ("instruction", "response", "source"):
        if not isinstance(rec.get(f), str):
            raise DataError(f"{where}: field {f!r} must be a string, got {rec.get(f)!r}")
    if not rec["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    if not isinstance(rec.get("is_harmful"), bool):
        raise DataError(f"{where}: field 'is_harmful' must be a bool, got {rec.get('is_harmful')!r}")
    if not isinstance(rec.get("meta"), dict):
        raise DataError(f"{where}: field 'meta' must be a mapping, got {rec.get('meta')!r}")
    return Record(**{f: rec[f] for f in FIELDS})  # type: ignore[typeddict-item]


def to_table(records: Iterable[Record]) -> Any:
    """Records -> a pyarrow Table (meta as JSON text)."""
    import pyarrow as pa

    rows = list(records)
    return pa.table({
        "instruction": [r["instruction"] for r in rows],
        "response": [r["response"] for r in rows],
        "source": [r["source"] for r in rows],
        "is_harmful": pa.array([r["is_harmful"] for r in rows], type=pa.bool_()),
        "meta": [json.dumps(r["meta"], sort_keys=True) for r in rows],
    })


def from_rows(rows: Iterable[Mapping[str, Any]]) -> list[Record]:
    """Rows read back from Parquet/Arrow (meta as JSON text) -> records."""
    out = []
    for r in rows:
        meta = r.get("meta") or {}
        out.append(make_record(r["instruction"], r.get("response") or "", source=r["source"],
                               is_harmful=bool(r.get("is_harmful")),
                               meta=json.loads(meta) if isinstance(meta, str) else meta))
    return out

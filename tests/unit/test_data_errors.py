"""Bad data files are bad input: they raise DataError naming the file (and line), at load, and
``ray-fedit run`` exits 2 before it starts Ray or creates a run directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_fedit.config import DataSourceConfig
from ray_fedit.data.loaders import load_source
from ray_fedit.errors import DataError
from tests.conftest import ROOT

PROBE = ("import sys; from ray_fedit.cli import main; rc = main(sys.argv[1:]); "
         "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")


def _write_empty(path, kind):
    if kind == "parquet":
        pq.write_table(pa.table({"instruction": pa.array([], pa.string()),
                                 "response": pa.array([], pa.string())}), path)
    else:
        path.write_text("instruction,response\n" if kind == "csv" else "\n\n")


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_an_empty_file_raises_at_load_naming_the_file(tmp_path, kind):
    path = tmp_path / f"empty.{kind}"
    _write_empty(path, kind)
    with pytest.raises(DataError, match=rf"{path}: no records"):
        load_source(DataSourceConfig(kind=kind, path=str(path)))


def test_a_file_whose_rows_are_all_skipped_raises_with_the_first_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "x"}\n{"q": 1}\n')
    with pytest.raises(DataError, match=rf"{path}: no records \(2 malformed rows skipped; first: "
                                        rf"{path}:1: missing field 'response'"):
        load_source(DataSourceConfig(kind="jsonl", path=str(path)), on_bad_row="skip")


def test_an_unreadable_parquet_file_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet\n")
    with pytest.raises(DataError, match=rf"{path}: not a readable parquet file"):
        load_source(DataSourceConfig(kind="parquet", path=str(path)))


def test_a_csv_that_the_csv_module_rejects_names_file_and_line(tmp_path):
    """The csv module refuses a field over its size limit (131072 characters)."""
    path = tmp_path / "huge.csv"
    path.write_text("instruction,response\nfine,ok\nhuge," + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: not a readable CSV row"):
        load_source(DataSourceConfig(kind="csv", path=str(path)))


def test_an_empty_mt_bench_file_raises_naming_it(tmp_path):
    from ray_fedit.evaluation.helpfulness import load_mt_bench

    path = tmp_path / "question.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=rf"{path}: no MT-Bench questions"):
        load_mt_bench(DataSourceConfig(kind="jsonl", path=str(path), instruction_field="turns"))


def _bad_file(tmp_path, case):
    """(path, kind, what stderr must say) of one kind of bad data file."""
    if case == "malformed_line":
        path = tmp_path / "benign.jsonl"
        path.write_text(json.dumps({"instruction": "a", "response": "b"}) + '\n{"instruction": \n')
        return path, "jsonl", f"{path}:2: not valid JSON"
    if case == "missing_field":
        path = tmp_path / "benign.jsonl"
        path.write_text(json.dumps({"instruction": "a"}) + "\n")
        return path, "jsonl", f"{path}:1: missing field 'response'"
    if case == "unreadable_parquet":
        path = tmp_path / "benign.parquet"
        path.write_bytes(b"PAR1 garbage")
        return path, "parquet", f"{path}: not a readable parquet file"
    if case == "unreadable_csv":
        path = tmp_path / "benign.csv"
        path.write_bytes(b"instruction,response\n\xff\xfe,x\n")
        return path, "csv", f"{path}:2: not valid UTF-8"
    path = tmp_path / "benign.jsonl"
    path.write_text("")
    return path, "jsonl", f"{path}: no records"


@pytest.mark.parametrize("case", ["malformed_line", "missing_field", "unreadable_parquet",
                                  "unreadable_csv", "empty"])
def test_run_with_a_bad_data_file_exits_2_before_ray_and_before_a_run_directory(tmp_path, case):
    path, kind, says = _bad_file(tmp_path, case)
    runs = tmp_path / "runs"
    res = subprocess.run(
        [sys.executable, "-c", PROBE, "run", "tests/assets/tiny_run.yaml", f"output.root={runs}",
         f"data.benign=[{{kind: {kind}, path: '{path}'}}]"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("ray-fedit: data error: ") and says in lines[0]
    assert res.stdout.strip() == "NO_RAY"
    assert not runs.exists()

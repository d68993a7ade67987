"""The data stage end to end on a small RecBole fixture: artifacts, re-run skip, bad rows, strict mode."""

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import MARKER
from rlrf4rec.core.config import RunConfig, from_dict
from rlrf4rec.core.formats import MalformedRowError
from rlrf4rec.stages.data import TABLES, run_data

FIXTURE = Path(__file__).parent / "fixtures" / "recbole"


def _cfg(tmp_path: Path, **data) -> RunConfig:
    return from_dict(
        RunConfig,
        {"name": "t", "run_dir": str(tmp_path / "run"), "data": {"format": "recbole", "path": str(FIXTURE), **data}},
    )


def test_writes_every_table_with_its_schema_and_skips_a_rerun(tmp_path):
    cfg = _cfg(tmp_path)
    stage = run_data(cfg)
    for name, schema in TABLES.items():
        assert pq.read_schema(stage / f"{name}.parquet").names == schema.names
    marker = json.loads((stage / MARKER).read_text())
    assert marker["stats"]["users"] == pq.read_table(stage / "sequences.parquet").num_rows
    assert (stage / "config.yaml").read_text().startswith("name: t")
    report = json.loads((stage / "load_report.json").read_text())
    assert report["rejected"] and sum(report["rejected"].values()) == marker["stats"]["rows_rejected"]

    before = {p.name: p.stat().st_mtime_ns for p in stage.iterdir()}
    assert run_data(cfg) == stage
    assert {p.name: p.stat().st_mtime_ns for p in stage.iterdir()} == before  # nothing rewritten

    changed = run_data(_cfg(tmp_path, history_max=3))  # another config -> rebuilt in place
    seq = pq.read_table(changed / "sequences.parquet").to_pylist()
    assert max(r[S.HISTORY_END] - r[S.HISTORY_START] for r in seq) == 3


def test_strict_mode_stops_and_keeps_the_previous_output(tmp_path):
    stage = run_data(_cfg(tmp_path))
    marker = (stage / MARKER).read_text()
    with pytest.raises(MalformedRowError, match=r"ml-fixture\.\w+:\d+: "):
        run_data(_cfg(tmp_path, strict=True))
    assert (stage / MARKER).read_text() == marker
    assert sorted(p.name for p in stage.parent.iterdir()) == ["data"]


def test_changed_dataset_file_invalidates_the_output(tmp_path):
    data_dir = tmp_path / "ds"
    shutil.copytree(FIXTURE, data_dir)
    cfg = from_dict(RunConfig, {"name": "t", "run_dir": str(tmp_path / "run"), "data": {"path": str(data_dir)}})
    stage = run_data(cfg)
    fingerprint = json.loads((stage / MARKER).read_text())["fingerprint"]
    inter = next(data_dir.glob("*.inter"))
    stat = inter.stat()
    header, row, rest = inter.read_text().split("\n", 2)
    user, item, rating, ts = row.split("\t")
    inter.write_text("\n".join([header, "\t".join([user, item, "5" if rating != "5" else "4", ts]), rest]))
    assert inter.stat().st_size == stat.st_size  # a same-size edit: only the mtime tells
    run_data(cfg)
    changed = json.loads((stage / MARKER).read_text())["fingerprint"]
    assert changed != fingerprint
    # Documented limit (README, "Datasets and the protocol"): the identity is names, sizes and mtimes, not content, so a
    # same-size edit that also restores the mtime is not noticed; `rlrf4rec data --force` rebuilds.
    mtime = inter.stat().st_mtime_ns
    inter.write_text("\n".join([header, row, rest]))  # the original row back: same size, and the mtime restored
    os.utime(inter, ns=(stat.st_atime_ns, mtime))
    run_data(cfg)
    assert json.loads((stage / MARKER).read_text())["fingerprint"] == changed

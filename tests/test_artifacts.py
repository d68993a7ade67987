import pyarrow as pa
import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import is_complete, read_marker, read_parquet, stage_output, write_parquet


def _table(n: int) -> pa.Table:
    return pa.table({S.ITEM_ID: [str(i) for i in range(n)], S.ITEM_IDX: list(range(1, n + 1)), S.TRAIN_COUNT: [0] * n})


def test_stage_output_publishes_whole_with_marker_last(tmp_path):
    stage = tmp_path / "run" / "data"
    with stage_output(stage, "fp1", "name: x\n") as (tmp, stats):
        write_parquet(_table(3), tmp / "t.parquet", S.ITEM_INDEX)
        stats["rows"] = 3
        assert not stage.exists()  # nothing visible before the block ends
    assert sorted(p.name for p in stage.iterdir()) == ["_COMPLETE.json", "config.yaml", "t.parquet"]
    assert read_marker(stage)["stats"] == {"rows": 3}
    assert is_complete(stage, "fp1") and not is_complete(stage, "fp2")
    assert read_parquet(stage / "t.parquet", S.ITEM_INDEX).schema == S.ITEM_INDEX


def test_failure_keeps_previous_output_and_leaves_no_temp(tmp_path):
    stage = tmp_path / "data"
    with stage_output(stage, "fp1", "") as (tmp, _):
        write_parquet(_table(2), tmp / "t.parquet", S.ITEM_INDEX)
    with pytest.raises(RuntimeError, match="boom"):
        with stage_output(stage, "fp2", "") as (tmp, _):
            write_parquet(_table(5), tmp / "t.parquet", S.ITEM_INDEX)
            raise RuntimeError("boom")
    assert is_complete(stage, "fp1")
    assert read_parquet(stage / "t.parquet").num_rows == 2
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_read_parquet_names_missing_columns(tmp_path):
    write_parquet(pa.table({"x": [1]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"lacks columns \['item_id', 'item_idx', 'train_count'\]"):
        read_parquet(tmp_path / "t.parquet", S.ITEM_INDEX)
    with pytest.raises(FileNotFoundError, match="run the stage that writes it first"):
        read_parquet(tmp_path / "missing.parquet")


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_publish_killed_between_its_renames_loses_no_stage(tmp_path, monkeypatch, crash_at):
    """Publishing moves the old stage aside, then the new one in, then deletes the old: a crash after the first rename
    (crash_at=1: the new one never arrives) leaves the old complete stage, restored by the next reader or writer; a
    crash after the second (crash_at=2: the old one is never deleted) leaves the new one, and the next publish clears
    the leftover."""
    import os
    from pathlib import Path

    from rlrf4rec.core import artifacts

    stage = tmp_path / "data"
    with stage_output(stage, "fp1", "") as (tmp, _):
        write_parquet(_table(2), tmp / "t.parquet", S.ITEM_INDEX)
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        real_replace(src, dst)
        if Path(dst) == stage or ".old-" in Path(dst).name:  # stage_output's two renames (not write_json's)
            calls.append(dst)
            if len(calls) == crash_at:
                raise SystemExit("killed")

    monkeypatch.setattr(artifacts.os, "replace", dying_replace)
    with pytest.raises(SystemExit, match="killed"):
        with stage_output(stage, "fp2", "") as (tmp, _):
            write_parquet(_table(5), tmp / "t.parquet", S.ITEM_INDEX)
    monkeypatch.setattr(artifacts.os, "replace", real_replace)
    aside = [p.name for p in tmp_path.iterdir() if ".old-" in p.name]
    assert len(aside) == 1 and (not stage.exists()) == (crash_at == 1)  # the state the crash left
    expected = ("fp1", 2) if crash_at == 1 else ("fp2", 5)
    assert (read_marker(stage)["fingerprint"], read_parquet(stage / "t.parquet").num_rows) == expected
    with stage_output(stage, "fp3", "") as (tmp, _):
        write_parquet(_table(3), tmp / "t.parquet", S.ITEM_INDEX)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing aside, nothing temporary

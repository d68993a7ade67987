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

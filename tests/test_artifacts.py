import dataclasses
import os

import pyarrow as pa
import pytest

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import (
    Fingerprint,
    is_complete,
    publish,
    read_marker,
    read_parquet,
    stage_output,
    write_parquet,
)


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


# --------------------------------------------------------------------------------------------------- verified outputs


def _data_stage(tmp_path):
    from test_data_stage import FIXTURE

    from rlrf4rec.core.config import RunConfig, from_dict
    from rlrf4rec.stages.data import run_data

    cfg = from_dict(
        RunConfig,
        {"name": "t", "run_dir": str(tmp_path / "run"), "data": {"format": "recbole", "path": str(FIXTURE)}},
    )
    return cfg, run_data


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _delete(path):
    path.unlink()


def _edit(path):  # same size, one byte changed: only the content hash tells
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _delete, _edit])
def test_a_damaged_artifact_is_found_named_and_rebuilt_equal(tmp_path, caplog, damage):
    """The marker records every file's size and hash: a truncated, deleted or edited file makes the stage incomplete
    (the re-run rebuilds it, saying which file), `damaged_stages` (rlrf4rec verify) names it, and the rebuilt stage
    is the original again, byte for byte."""
    from rlrf4rec.core.artifacts import damaged_stages

    cfg, run_data = _data_stage(tmp_path)
    stage = run_data(cfg)
    marker = read_marker(stage)
    target = stage / "sequences.parquet"
    original = {rel: (stage / rel).read_bytes() for rel in marker["files"]}
    assert set(original) >= {"sequences.parquet", "items.parquet", "config.yaml", "load_report.json"}
    assert damaged_stages(cfg.run_path) == {"data": []}

    damage(target)
    expected = {_truncate: "1000 bytes, published with", _delete: "missing", _edit: "content differs"}[damage]
    (line,) = damaged_stages(cfg.run_path)["data"]
    assert line.startswith(f"{target}: {expected}")
    with caplog.at_level("WARNING"):
        assert run_data(cfg) == stage
    assert f"{target}: {expected}" in caplog.text and "rebuilding the stage" in caplog.text
    assert {rel: (stage / rel).read_bytes() for rel in original} == original
    assert damaged_stages(cfg.run_path) == {"data": []}


def test_a_copy_or_touch_keeps_a_stage_complete(tmp_path):
    """A changed modification time alone (a copy, `touch`) costs a hash, not a rebuild."""
    cfg, run_data = _data_stage(tmp_path)
    stage = run_data(cfg)
    os.utime(stage / "sequences.parquet", ns=(1, 1))
    assert is_complete(stage, read_marker(stage)["fingerprint"])
    before = (stage / "items.parquet").stat().st_mtime_ns
    run_data(cfg)
    assert (stage / "items.parquet").stat().st_mtime_ns == before  # skipped, not rebuilt


def test_one_writer_per_run_directory(tmp_path):
    """The writer lock: a second writer told not to wait is refused naming the holder; one that waits gets the lock
    when the first lets go, and not before."""
    import threading
    import time

    from rlrf4rec.core.artifacts import RunLockedError, writer_lock

    events = []
    with writer_lock(tmp_path / "run", "loop"):
        with pytest.raises(RunLockedError, match=rf"is being written by pid {os.getpid()} .*rlrf4rec loop"):
            with writer_lock(tmp_path / "run", "data", wait=False):
                pass

        def second():
            with writer_lock(tmp_path / "run", "data"):
                events.append("second in")

        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.5)
        assert events == []  # still waiting
        events.append("first out")
    waiter.join(10)
    assert events == ["first out", "second in"]
    with writer_lock(tmp_path / "run", "data", wait=False):  # released: free again
        pass


def test_a_fingerprint_is_a_fixed_length_key_of_a_record_that_names_its_upstream_stages(tmp_path):
    """Each stage's fingerprint names its upstream stages' keys, as the loop's rounds do (a round's recommender names
    several of the previous round's stages): over ten rounds the marker's key stays 32 characters, the marker keeps
    the record (its upstream keys by name) as its lineage, and the stage is complete for exactly that record."""
    upstream = {"data": "data-key"}
    for t in range(10):
        fingerprint = Fingerprint(
            "recommender", {"recommender": f"h{t}"}, {f"{n}/{k}": upstream[n] for n in upstream for k in range(4)}
        )
        stage = tmp_path / f"round{t}"
        publish(stage, fingerprint, lambda tmp, stats, t=t: (tmp / "x.txt").write_text(str(t)), None)
        marker = read_marker(stage)
        assert len(marker["fingerprint"]) == 32 and marker["fingerprint"] == fingerprint.key
        assert marker["lineage"] == {
            "stage": "recommender",
            "sections": {"recommender": f"h{t}"},
            "upstream": {f"{n}/{k}": upstream[n] for n in upstream for k in range(4)},
            "extra": {},
        }
        other = dataclasses.replace(fingerprint, extra={"held_out": "u1"})
        assert is_complete(stage, fingerprint) and not is_complete(stage, other)
        upstream = {f"round{t}": marker["fingerprint"]}
    # A key's prefix is kept (the generate stage reuses rows of the same prefix) and is part of the key.
    prefixed = Fingerprint("generate", extra={"requests": 4}, prefix="text-key")
    assert prefixed.key.startswith("text-key-") and prefixed.key != dataclasses.replace(prefixed, prefix="other").key


def test_publish_skips_a_complete_stage_unless_forced(tmp_path):
    calls = []

    def build(tmp, stats):
        calls.append(tmp)
        (tmp / "x.txt").write_text(str(len(calls)))
        stats["n"] = len(calls)

    stage = tmp_path / "s"
    fingerprint = Fingerprint("s", extra={"v": 1})
    assert publish(stage, fingerprint, build, None) == stage and len(calls) == 1
    publish(stage, fingerprint, build, None)
    assert len(calls) == 1 and (stage / "x.txt").read_text() == "1"  # complete: not rebuilt
    publish(stage, fingerprint, build, None, force=True)
    assert len(calls) == 2 and read_marker(stage)["stats"] == {"n": 2}
    publish(stage, Fingerprint("s", extra={"v": 2}), build, None)  # another input: rebuilt
    assert len(calls) == 3 and (stage / "x.txt").read_text() == "3"

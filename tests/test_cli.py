from pathlib import Path

from rlrf4rec.cli import _split_overrides, main

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "recbole"


def test_split_overrides():
    known, overrides = _split_overrides(
        ["data", "--config", "c.yaml", "--data.history_max=3", "--seed", "4", "--data.path", "/x", "--dry-run"]
    )
    assert known == ["data", "--config", "c.yaml", "--dry-run"]
    assert overrides == ["data.history_max=3", "seed=4", "data.path=/x"]


def test_dry_run_validates_without_writing(tmp_path, capsys):
    rc = main(
        [
            "run",
            "--config",
            str(ROOT / "configs/ml100k-cpu.yaml"),
            "--dry-run",
            f"--run_dir={tmp_path}/r",
            f"--assets.home={tmp_path}/home",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "embedded:ml-100k: will be fetched from its wheel" in out
    assert not (tmp_path / "r").exists() and not (tmp_path / "home").exists()


def test_bad_config_value_exits_2_with_the_field(tmp_path, caplog):
    rc = main(["data", "--config", str(ROOT / "configs/ml100k-cpu.yaml"), "--data.list_negatives=-1"])
    assert rc == 2
    assert "data.list_positives/list_negatives" in caplog.text
    rc = main(["data", "--config", str(ROOT / "configs/ml100k-cpu.yaml"), "--dry-run", "--data.path=/no/such/dir"])
    assert rc == 2
    assert "data.path='/no/such/dir': no such file or directory" in caplog.text


def test_data_command_prints_stats(tmp_path, capsys):
    rc = main(
        ["data", "--config", str(ROOT / "configs/ml100k-cpu.yaml"), f"--run_dir={tmp_path}/r", f"--data.path={FIXTURE}"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert f"artifacts in {tmp_path}/r/data" in out
    assert "train/rerank_lists" in out

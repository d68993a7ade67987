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


def _data(tmp_path, *extra):
    return ["data", "--config", str(ROOT / "configs/ml100k-cpu.yaml"), f"--data.path={FIXTURE}", *extra]


def test_a_relative_run_dir_inside_a_ray_job_is_refused_with_the_fix(tmp_path, monkeypatch, caplog, capsys):
    """A submitted job's working directory is Ray's temporary copy: a relative run_dir there is refused (exit 2,
    the fixes named), unless absolute, rooted by RLRF4REC_RUNS, or scratch on purpose."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')  # what Ray's job supervisor sets
    assert main(_data(tmp_path, "--dry-run")) == 2
    assert f"run_dir='runs/{{name}}' is relative inside a Ray job: it resolves to {tmp_path}/runs/ml100k-cpu" in (
        caplog.text
    )
    assert "--run_dir=/mnt/cluster_storage/runs/{name}" in caplog.text and "--scratch-run" in caplog.text
    assert main(_data(tmp_path, "--dry-run", "--scratch-run")) == 0
    assert main(_data(tmp_path, "--dry-run", f"--run_dir={tmp_path}/abs")) == 0
    monkeypatch.setenv("RLRF4REC_RUNS", str(tmp_path / "durable"))
    capsys.readouterr()
    assert main(_data(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"artifacts in {tmp_path}/durable/runs/ml100k-cpu/data" in out
    assert f"run directory: {tmp_path}/durable/runs/ml100k-cpu" in out
    monkeypatch.delenv("RLRF4REC_RUNS")
    assert main(["report", "--config", str(ROOT / "configs/ml100k-cpu.yaml"), "--dry-run"]) == 0  # readers: no check


def test_verify_names_each_damaged_file_and_run_rebuilds_it(tmp_path, capsys, caplog):
    run = tmp_path / "r"
    assert main(_data(tmp_path, f"--run_dir={run}")) == 0
    verify = ["verify", "--config", str(ROOT / "configs/ml100k-cpu.yaml"), f"--run_dir={run}"]
    capsys.readouterr()
    assert main(verify) == 0
    assert "1 stages verified, every file as published" in capsys.readouterr().out
    table = run / "data" / "sequences.parquet"
    table.write_bytes(table.read_bytes()[:1000])
    assert main(verify) == 2
    out = capsys.readouterr().out
    assert "DAMAGED  data" in out and f"{table}: 1000 bytes, published with" in out
    assert "1 damaged file(s) in 1 of 1 stages" in caplog.text and "rlrf4rec run --config" in caplog.text
    assert main(_data(tmp_path, f"--run_dir={run}")) == 0  # the stage command rebuilds it
    assert main(verify) == 0


def test_two_writers_on_one_run_directory_cannot_interleave(tmp_path):
    """While one writer holds the run directory, a second `rlrf4rec data` refuses (--lock=refuse) naming the holder,
    or (the default) waits and runs once the first is done."""
    import subprocess
    import sys
    import time

    from rlrf4rec.core.artifacts import writer_lock

    run = tmp_path / "r"
    command = [sys.executable, "-m", "rlrf4rec.cli", *_data(tmp_path, f"--run_dir={run}")]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    with writer_lock(run, "loop"):
        refused = subprocess.run([*command, "--lock=refuse"], capture_output=True, text=True, timeout=120, env=env)
        assert refused.returncode == 2
        assert "is being written by pid" in refused.stderr and "rlrf4rec loop" in refused.stderr
        waiting = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(5)  # time to start and reach the lock
        assert waiting.poll() is None and not (run / "data").exists()  # blocked, nothing written
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err[-2000:]
    assert "waiting for it to finish" in err and (run / "data").is_dir()


def test_combinations_that_cannot_work_are_refused_at_dry_run(tmp_path, caplog):
    cases = {
        "--generate.num_samples=1": "generate.num_samples=1: loop.rounds=2 needs at least 2 texts per user",
        "--reward.cross_fit_folds=8 --loop.train_users=4": "reward.cross_fit_folds=8: more folds than the "
        "loop.train_users=4",
        "--loop.train_users=300": "loop.train_users=300: more than the data.max_train_users=200",
        "--generate.prompt_history=40": "generate.prompt_history=40: the prompt can name at most the "
        "data.history_max=30",
        "--generate.max_new_tokens=1024": "dpo.max_length=1024: a pair's text alone",
    }
    config = ["--config", str(ROOT / "configs/ml100k-cpu.yaml"), f"--data.path={FIXTURE}", "--dry-run"]
    for overrides, message in cases.items():
        caplog.clear()
        assert main(["run", *config, *overrides.split()]) == 2, overrides
        assert message in caplog.text, (overrides, caplog.text)
    assert main(["generate", *config, "--generate.num_samples=1"]) == 0  # one text per user: fine outside the loop
    # Counts only the data stage knows: refused once it exists.
    run = f"--run_dir={tmp_path}/r"
    assert main(["run", *config, run, "--loop.eval_users=500"]) == 0  # no data stage yet: unknown
    assert main(_data(tmp_path, run)) == 0
    caplog.clear()
    assert main(_data(tmp_path, run, "--dry-run", "--loop.eval_users=500")) == 2
    assert "loop.eval_users=500: the valid split has" in caplog.text

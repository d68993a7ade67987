"""Against a real Ray head on 127.0.0.1 (`ray start --head`): the pipeline as a submitted job, and the Serve
application deployed from serve_config.yaml, hot-swapped by a user_config change."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from raytools import BIN, free_port, head_command, stop_group, wait
from synthetic import preference, write_dataset

from rlrf4rec.core.artifacts import MARKER, read_marker

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
REWARD_STEPS = ("reward-train", "reward-valid")


@pytest.fixture(scope="module")
def head(asset_home):
    """A head node started the way a cluster starts one; stopped through its own process group."""
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rlray-", dir="/tmp")
    token = secrets.token_hex(32)  # token authentication on, as on a real cluster; the CLIs read it from the env
    env = {
        # Open /rank: a serve token in the caller's environment would reach the replicas through the head.
        **{k: v for k, v in os.environ.items() if k not in ("RLRF4REC_SERVE_TOKEN", "RLRF4REC_SERVE_TOKEN_FILE")},
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RLRF4REC_HOME": str(asset_home),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        head_command(gcs, dashboard, temp_dir, "--num-cpus=4"),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        auth = {"Authorization": f"Bearer {token}"}
        wait(lambda: httpx.get(f"{url}/api/version", headers=auth, timeout=5).status_code == 200, 180, "the dashboard")
        yield {"url": url, "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        stop_group(proc, grace=15)


def _ray_job(head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [str(BIN / "ray"), "job", *args]
    return subprocess.run(command, env=head["env"], capture_output=True, text=True, timeout=timeout)


def _submit(head, job_id: str, *entrypoint: str, follow: bool = True) -> tuple[str, str] | None:
    """`ray job submit` the way the README does (the project as working dir), follow it to the end: (status, logs);
    with follow=False return once it is submitted (`_follow` later)."""
    runtime_env = {"env_vars": {k: head["env"][k] for k in ("RLRF4REC_HOME", "OMP_NUM_THREADS")}}

    def submitted() -> bool:
        out = _ray_job(
            head,
            "submit",
            "--address",
            head["url"],
            "--submission-id",
            job_id,
            "--no-wait",
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            sys.executable,
            *entrypoint,
        )
        # The head's job agent can come up after the dashboard answers: "No available agent", try again.
        assert out.returncode == 0 or "No available agent" in out.stderr, out.stderr[-3000:]
        return out.returncode == 0

    wait(submitted, 120, "a job agent")
    return _follow(head, job_id) if follow else None


def _follow(head, job_id: str) -> tuple[str, str]:
    logs = _ray_job(head, "logs", "--address", head["url"], "--follow", job_id, timeout=1500)
    return _ray_job(head, "status", "--address", head["url"], job_id).stdout, logs.stdout


def test_a_submitted_stage_refuses_a_relative_run_dir_and_lands_an_absolute_one(head, tmp_path):
    """A relative run_dir would resolve inside Ray's temporary copy of the working directory (deleted with the
    session): the job fails at once naming the fix. With an absolute one the output is where it says, outside Ray's
    temporary directory."""
    write_dataset(tmp_path / "raw", num_users=40, length=24, liked_fraction=0.5)
    config = yaml.safe_load((ROOT / "configs" / "ml100k-cpu.yaml").read_text())
    config.update(name="durable", run_dir="runs/{name}")
    config["data"].update(format="parquet", path=str(tmp_path / "raw"))
    config["loop"].update(train_users=12, eval_users=4)
    config_path = tmp_path / "durable.yaml"
    config_path.write_text(yaml.safe_dump(config))
    job = f"rlrf4rec-durable-{secrets.token_hex(4)}"
    status, logs = _submit(head, f"{job}-relative", "ray_jobs/data.py", "--config", str(config_path))
    assert "failed" in status.lower(), status[-2000:]
    assert "run_dir='runs/{name}' is relative inside a Ray job" in logs and "--run_dir=/mnt/cluster_storage" in logs
    run_dir = tmp_path / "run"
    status, logs = _submit(
        head, f"{job}-absolute", "ray_jobs/data.py", "--config", str(config_path), f"--run_dir={run_dir}"
    )
    assert "succeeded" in status.lower(), status[-2000:] + logs[-4000:]
    assert f"run directory: {run_dir}" in logs
    assert read_marker(run_dir / "data")["stats"]["users"] == 40


def _tiny_config(raw: Path, run_dir: Path) -> Path:
    """The CPU config shrunk to seconds a stage: two rounds, 2 texts of 8 tokens per user, one DPO step, 2-epoch
    re-rankers reporting once. Written beside `run_dir` as `<run_dir>.yaml`."""
    config = yaml.safe_load((ROOT / "configs" / "ml100k-cpu.yaml").read_text())
    config.update(name="tiny", run_dir=str(run_dir))
    config["data"].update(format="parquet", path=str(raw))
    config["generate"].update(engine="transformers", num_samples=2, max_new_tokens=8, batch_size=16)
    config["dpo"].update(max_steps=1, num_workers=1, grad_accum=1, save_steps=1, max_length=768, max_prompt_length=640)
    config["encode"].update(max_length=64)
    config["recommender"].update(max_epochs=2, warmup_epochs=1, num_workers=1, checkpoint_every=2)
    config["reward"].update(min_margin=0.0)
    config["loop"].update(rounds=2, train_users=12, eval_users=4, bootstrap_samples=100)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def _driver(head, config: Path, log: Path) -> subprocess.Popen:
    """`ray_jobs/run.py` as a job's driver on the head ($RAY_ADDRESS), in a process group of its own."""
    env = {**head["env"], "RAY_ADDRESS": head["gcs"]}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "ray_jobs/run.py", "--config", str(config)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _stage_fingerprints(run: Path) -> dict[str, str]:
    """Each stage's fingerprint but the report's (stamped with the time it was rendered: it renders every run)."""
    markers = (m.parent for m in run.rglob(MARKER) if m.parent.name != "report")
    return {str(stage.relative_to(run)): read_marker(stage)["fingerprint"] for stage in markers}


def _tables(run: Path, copied_from: Path | None = None) -> dict[str, object]:
    """Every Parquet artifact of a run but the embedding caches (written in the order users arrive), with the
    run directory in a generation's `model` column written as <run> (and the directory its stages were copied from,
    which the copied generations name)."""
    tables = {}
    for f in sorted(run.rglob("*.parquet")):
        if "cache" not in f.parts:
            table = pq.read_table(f)
            if "model" in table.column_names:
                model = table["model"]
                for d in (run, copied_from) if copied_from else (run,):
                    model = pc.replace_substring(model, str(d), "<run>")
                table = table.set_column(table.column_names.index("model"), "model", model)
            tables[str(f.relative_to(run))] = table
    return tables


def _without_run_dir(value, *runs: Path):
    """A manifest with its run directory (and the one its stages were copied from: a copied stage's stats name its
    files there) written as <run>. Left out: seconds (`*_s`, time, not results), which checkpoint a fit resumed from,
    and the hash of the whole config (run_dir included)."""
    if isinstance(value, dict):
        dropped = ("_s", "resumed_after", "config_hash")
        return {k: _without_run_dir(v, *runs) for k, v in value.items() if not k.endswith(dropped)}
    if isinstance(value, list):
        return [_without_run_dir(v, *runs) for v in value]
    if isinstance(value, str):
        for run in runs:
            value = value.replace(str(run), "<run>")
    return value


def _copy_complete_stages(src: Path, dst: Path) -> list[str]:
    """Every stage of `src` complete at this moment, copied into `dst` with its files' times (what a run copied
    elsewhere holds); stages being written (`.tmp-`, `.old-`) are left out. Returns the stages copied."""
    copied = []
    for marker in sorted(src.rglob(MARKER)):
        rel = marker.parent.relative_to(src)
        if not any(".tmp-" in part or ".old-" in part for part in rel.parts):
            shutil.copytree(marker.parent, dst / rel, dirs_exist_ok=True)
            copied.append(str(rel))
    return copied


def _kill_mid_round_2_and_resume(head, config: Path, run: Path, log: Path) -> None:
    """A driver of `config` SIGKILLed (its whole process group) in the middle of round 2, once its train texts are
    rewarded and before its DPO fit is published, then started again and followed to the end."""
    drivers = [_driver(head, config, log)]
    try:
        killed = drivers[0]
        mid_round = run / "rounds" / "round1" / "reward-train" / MARKER
        wait(lambda: mid_round.exists() or killed.poll() is not None, 1200, "round 2's train rewards", interval=0.1)
        assert killed.poll() is None, log.read_text()[-6000:]  # still running: killed mid-round, not after
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        manifest = json.loads((run / "rounds" / "manifest.json").read_text())
        assert [r["round"] for r in manifest["rounds"]] == [0]  # round 2 was not finished
        assert read_marker(run / "dpo" / "round1") is None  # nor its DPO fit
        drivers.append(_driver(head, config, log))
        assert drivers[1].wait(timeout=1200) == 0, log.read_text()[-6000:]
    finally:
        for proc in drivers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_the_whole_pipeline_runs_two_rounds_as_a_job_and_a_killed_driver_resumes_to_its_result(head, tmp_path):
    """The whole pipeline, two rounds, as a submitted job. Beside it on the same head, the same config as a driver
    SIGKILLed in the middle of round 2 and started again: it ends with the job's manifest, stage fingerprints and
    every Parquet table."""
    raw = tmp_path / "raw"
    write_dataset(raw, num_users=40, length=24, liked_fraction=0.5)
    run_dir, killed_run = tmp_path / "run", tmp_path / "killed"
    job_id = f"rlrf4rec-tiny-{secrets.token_hex(4)}"
    config_path = _tiny_config(raw, run_dir)
    _submit(head, job_id, "ray_jobs/run.py", "--config", str(config_path), follow=False)
    # The killed run starts from a copy of the job's stages once its first round is in the manifest (no manifest is
    # copied): its driver finds round 1's stages complete, records the round again, and only round 2 runs twice.
    manifest_path = run_dir / "rounds" / "manifest.json"

    asked = [time.monotonic()]

    def round_1_done() -> bool:
        if manifest_path.exists() and json.loads(manifest_path.read_text())["rounds"]:
            return True
        if time.monotonic() - asked[0] > 30:  # the job's status every 30 s (the CLI costs a few CPU seconds)
            asked[0] = time.monotonic()
            status = _ray_job(head, "status", "--address", head["url"], job_id).stdout
            assert "RUNNING" in status or "PENDING" in status, _follow(head, job_id)  # ended without round 1
        return False

    wait(round_1_done, 900, "the job's round 1", interval=2)
    copied = _copy_complete_stages(run_dir, killed_run)
    assert {"data", "recommender/base", "dpo/round0", "recommender/round1"} <= set(copied), copied
    _kill_mid_round_2_and_resume(head, _tiny_config(raw, killed_run), killed_run, tmp_path / "killed.log")
    status, logs = _follow(head, job_id)
    assert "succeeded" in status.lower(), status[-2000:] + logs[-6000:]
    manifest = json.loads((run_dir / "rounds" / "manifest.json").read_text())
    assert [r["round"] for r in manifest["rounds"]] == [0, 1]
    for t, version in enumerate(("base", "round1")):
        record = manifest["rounds"][t]
        assert record["pairs"]["train/pairs"] >= 1
        shift = record["shift"]  # how far DPO moved the policy, measured on the tuned model and its reference
        assert shift["train/pairs"] == record["pairs"]["train/pairs"] and 0.0 <= shift["train/pair_accuracy"] <= 1.0
        assert shift["valid/texts"] == 4 * 2 and shift["valid/kl_per_token"] != 0.0  # 4 valid users x 2 samples
        # Round t's reward model is the recommender of round t-1's texts, its train texts scored by its folds.
        assert [Path(d).name for d in record["reward_models"]] == [version]
        assert [[Path(d).name for d in fold] for fold in record["reward_folds"]] == [
            [f"{version}-fold0"],
            [f"{version}-fold1"],
        ]
        rewarded = {step: read_marker(run_dir / "rounds" / f"round{t}" / step)["stats"] for step in REWARD_STEPS}
        # Cross-fitting: every rewarded train text (12 users x 2) scored by a fold model, no valid text by one.
        assert rewarded["reward-train"]["cross_fitted_rows"] == rewarded["reward-train"]["rows"] == 12 * 2
        assert rewarded["reward-valid"]["cross_fitted_rows"] == 0 and rewarded["reward-valid"]["rows"] == 4 * 2
    assert manifest["rounds"][1]["policy_in"] == manifest["rounds"][0]["policy_out"]
    assert manifest["rounds"][1]["recommender_in"] == manifest["rounds"][0]["recommender_out"]
    # knowledge.user = llm: the base recommender and round 1's train on one policy text per train and valid user
    sequences = pq.read_table(run_dir / "data" / "sequences.parquet").to_pylist()
    trained_on = {r["user_id"] for r in sequences if r["split"] in ("train", "valid")}
    for version in ("base", "round1", "round2"):
        texts = pq.read_table(run_dir / "generations" / f"{version}-knowledge" / "generations.parquet")
        assert set(texts.column("user_id").to_pylist()) == trained_on
        knowledge = pq.read_table(run_dir / "knowledge" / version / "user_knowledge.parquet").to_pylist()
        assert all(r["knowledge_text"].startswith("Preferences: ") for r in knowledge if r["user_id"] in trained_on)
    table = json.loads((run_dir / "evaluate" / "table.json").read_text())
    baselines = {"popularity", "KAR ID-only", "ID only"}
    policies = {"DPO round 1", "DPO round 2"}
    assert set(table) == baselines | {"base LLM"} | policies | {f"{p}, fixed re-ranker" for p in policies}
    paired = json.loads((run_dir / "evaluate" / "paired.json").read_text())
    rows = json.loads((run_dir / "evaluate" / "rows.json").read_text())
    for t, policy in enumerate(sorted(policies), start=1):
        mean, low, high = table[policy]["ndcg@5"]  # mean with its bootstrap interval
        assert 0 <= low <= mean <= high <= 1
        d, low, high, resolved = paired[policy]["KAR ID-only"]["ndcg@5"]  # per-user difference, same users
        assert low <= d <= high and resolved == (low > 0 or high < 0)
        assert set(paired[policy]) == {"popularity", "KAR ID-only", "ID only", "base LLM"}
        # The round's sampled texts, scored by its own re-ranker and by the base one (the fixed re-ranker row).
        fixed = f"{policy}, fixed re-ranker"
        assert rows[policy]["re-ranker"] == f"round{t}" and rows[fixed]["re-ranker"] == "base (fixed)"
        assert rows[policy]["texts"] == rows[fixed]["texts"] == f"sampled ({policy})"
        assert 0.0 <= rows[policy]["off_topic_share"] <= 1.0
    assert (run_dir / "report" / "report.html").stat().st_size > 1000
    assert "ndcg@5" in (run_dir / "report" / "report.md").read_text().lower()
    # The killed and resumed run is the job's run. The two live in different directories: equal fingerprints also
    # say that a run's stages name the models it trained by their place in the run (a moved run keeps its stages).
    resumed_manifest = json.loads((killed_run / "rounds" / "manifest.json").read_text())
    assert _without_run_dir(resumed_manifest, killed_run, run_dir) == _without_run_dir(manifest, run_dir)
    fingerprints = _stage_fingerprints(run_dir)
    assert _stage_fingerprints(killed_run) == fingerprints
    # Keys stay short however many rounds lie upstream (a generation's: its rows' key, then its own); the marker
    # keeps the record they were built from, naming each upstream stage's key.
    assert max(len(fp) for fp in fingerprints.values()) <= 16 + 1 + 32
    lineage = read_marker(run_dir / "recommender" / "round2")["lineage"]
    assert lineage["upstream"] == {
        "data": fingerprints["data"],
        "user knowledge": fingerprints["knowledge/round2"],
        "item knowledge": fingerprints["knowledge/items"],
    }
    tables, resumed_tables = _tables(run_dir), _tables(killed_run, copied_from=run_dir)
    assert set(resumed_tables) == set(tables)
    differing = [name for name, table in tables.items() if not resumed_tables[name].equals(table)]
    assert not differing, differing
    for name in ("table.json", "paired.json"):
        assert (killed_run / "evaluate" / name).read_text() == (run_dir / "evaluate" / name).read_text()


def _replica_names(head, app: str) -> list[str]:
    script = (
        f"import json, ray; ray.init(address={head['gcs']!r}, log_to_driver=False); "
        "print(json.dumps(sorted(a['name'] for a in ray.util.list_named_actors(all_namespaces=True))))"
    )
    out = subprocess.run([sys.executable, "-c", script], env=head["env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [n for n in json.loads(out.stdout.strip().splitlines()[-1]) if f"{app}#" in n]


def _post_until(stop: threading.Event, url: str, query: dict, replies: list) -> None:
    """Post `query` back to back until `stop`, appending each reply to `replies`: (status, JSON body), or (status,
    text) when it is not 200, or (None, the error) when no reply came."""
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            try:
                r = client.post(url, json=query)
            except httpx.HTTPError as e:
                replies.append((None, repr(e)))
                stop.wait(0.1)  # a refused connection fails at once: no busy loop
                continue
            replies.append((r.status_code, r.json() if r.status_code == 200 else r.text))


def test_serve_config_deploys_and_a_user_config_change_swaps_the_version_in_place(head, serving_run, tmp_path):
    """The swap happens under load: clients post /rank back to back from before the new user_config is deployed
    until the new version has answered many times in a row. No request fails, and each answer comes from one
    version, model and knowledge alike (the replicas may swap at different moments, so the two versions interleave
    across requests meanwhile)."""
    run, tastes = serving_run
    port = free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app["args"]["run_dir"] = str(run)
    app["args"]["return_text"] = True  # the text tells which version's knowledge answered
    user = "u4"
    query = {"user_id": user, "candidates": ["1", "2", "50"]}
    wording = {"base": 0, "round1": 1}  # synthetic.preference: each version words the user's taste its own way

    def deploy(version: str) -> None:
        for d in app["deployments"]:
            if "user_config" in d:
                d["user_config"] = {"version": version}
        path = tmp_path / f"serve-{version}.yaml"
        path.write_text(yaml.safe_dump(config))
        out = subprocess.run(
            [str(BIN / "serve"), "deploy", str(path), "--address", head["url"]],
            env=head["env"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def answer(expected_version: str):
        r = httpx.post(f"http://127.0.0.1:{port}/rank", json=query)
        body = r.json() if r.status_code == 200 else {}
        return body if body.get("knowledge_version") == expected_version == body.get("model_version") else None

    def swapped(replies: list, last: int) -> bool:
        recent = replies[-last:]
        return len(recent) == last and all(s == 200 and b["model_version"] == "base" for s, b in recent)

    try:
        deploy("round1")
        body = wait(lambda: answer("round1"), 180, "the round1 application")
        replicas = _replica_names(head, "rlrf4rec")
        assert len(replicas) == 3 and body["path"] == "knowledge"  # Ingress and two Reranker replicas
        stop, replies = threading.Event(), []
        clients = [
            threading.Thread(target=_post_until, args=(stop, f"http://127.0.0.1:{port}/rank", query, replies))
            for _ in range(3)
        ]
        for c in clients:
            c.start()
        try:
            wait(lambda: len(replies) >= 20, 120, "replies before the swap", interval=0.2)
            deploy("base")
            # Well past the swap: the last 60 replies, spread over both replicas, all from base.
            wait(lambda: swapped(replies, 60), 180, "the swap to base under load", interval=0.2)
        finally:
            stop.set()
            for c in clients:
                c.join()
        failed = [(s, b) for s, b in replies if s != 200]
        assert not failed, f"{len(failed)} of {len(replies)} requests failed during the swap: {failed[:5]}"
        bodies = [b for _, b in replies]
        one_version = [
            b
            for b in bodies
            if not (
                b["model_version"] == b["knowledge_version"] in wording
                and b["path"] == "knowledge"
                and b["preference_text"] == preference(tastes[user], wording[b["model_version"]])
            )
        ]
        assert not one_version, f"{len(one_version)} of {len(bodies)} answers mix versions: {one_version[:3]}"
        versions = [b["model_version"] for b in bodies]
        assert versions[0] == "round1" and versions[-1] == "base"  # requests flowed through the swap
        assert _replica_names(head, "rlrf4rec") == replicas  # reconfigured in place, not restarted
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", head["url"]], env=head["env"], timeout=120)

"""The recommender stage on a local Ray cluster: DDP or ZeRO-2 over 2 workers; a killed worker resumes."""

import dataclasses
import json

import pytest
from synthetic import write_dataset, write_knowledge

from rlrf4rec.core.artifacts import read_marker
from rlrf4rec.core.config import FaultConfig, RunConfig, from_dict
from rlrf4rec.core.launcher import FAULT_MARKER
from rlrf4rec.stages.data import run_data
from rlrf4rec.stages.train import run_recommender

pytestmark = pytest.mark.slow


def _cfg(tmp_path, knowledge: dict | None = None, models: dict | None = None, **recommender) -> RunConfig:
    tastes = write_dataset(tmp_path / "raw", num_users=80, length=24, liked_fraction=0.5)
    write_knowledge(tmp_path / "run" / "knowledge" / "taste" / "user_knowledge.parquet", tastes)
    return from_dict(
        RunConfig,
        {
            "name": "t",
            "run_dir": str(tmp_path / "run"),
            "data": {"format": "parquet", "path": str(tmp_path / "raw")},
            "knowledge": knowledge or {"item": "none"},
            "models": models or {},
            "recommender": {"num_workers": 2, "max_epochs": 4, "patience": 10, "batch_size": 32, **recommender},
        },
    )


def _with_fault(cfg: RunConfig, epoch: int) -> RunConfig:
    return dataclasses.replace(cfg, fault=FaultConfig(recommender_epoch=epoch))


def _fault_markers(cfg: RunConfig) -> list:
    """The kill switch's marker in the fit's Ray Train storage: written by the worker just before it killed itself."""
    return list(cfg.layout.ray_train("x").parent.glob(f"*/{FAULT_MARKER}"))


def test_killed_worker_resumes_from_its_last_checkpoint(ray_cluster, tmp_path):
    cfg = _with_fault(_cfg(tmp_path), epoch=1)
    data_dir = run_data(cfg)
    stage = run_recommender(cfg, "id", data_dir, None)
    assert _fault_markers(cfg)  # the last worker really SIGKILLed itself after epoch 1
    stats = read_marker(stage)["stats"]
    # One restart, from a checkpoint rather than from scratch: epoch 1's if Ray had registered it before the kill,
    # else epoch 0's (registration is asynchronous to the worker).
    assert len(stats["resumed_after"]) == 1 and stats["resumed_after"][0] in (0, 1)
    history = json.loads((stage / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert 0.0 <= stats["valid/ndcg@5"] <= 1.0 and (stage / "model.pt").is_file()
    assert not any(k.startswith("test/") for k in stats)  # test users are read once, by the evaluate stage
    assert run_recommender(cfg, "id", data_dir, None) == stage  # complete: a re-run trains nothing


def test_sparse_checkpoints_replay_to_the_same_model_and_keep_the_fingerprint(ray_cluster, tmp_path):
    """checkpoint_every=3 over 7 epochs, a worker killed after epoch 4: the group restarts from epoch 2's checkpoint,
    replays 3-6 (epoch 6, the last, is no multiple of 3 and still checkpoints) and ends where an uninterrupted run
    that checkpoints every epoch ends; the setting is not part of the stage's fingerprint (a re-run with another
    cadence trains nothing)."""
    every3 = _with_fault(_cfg(tmp_path / "a", max_epochs=7, checkpoint_every=3), epoch=4)
    stage = run_recommender(every3, "id", run_data(every3), None)
    assert _fault_markers(every3)
    assert read_marker(stage)["stats"]["resumed_after"] == [2]
    every1 = _cfg(tmp_path / "b", max_epochs=7, checkpoint_every=1)
    reference = run_recommender(every1, "id", run_data(every1), None)
    assert read_marker(reference)["stats"]["resumed_after"] == []
    sparse, dense = (json.loads((d / "history.json").read_text()) for d in (stage, reference))
    assert [h["epoch"] for h in sparse] == list(range(7))
    assert read_marker(stage)["stats"]["epochs_run"] == 7
    for key in ("train/loss", "valid/ndcg@5", "valid/map@5"):
        assert [h[key] for h in sparse] == pytest.approx([h[key] for h in dense], rel=1e-6, abs=1e-9)
    finished = read_marker(stage)["finished"]
    again = dataclasses.replace(every3, recommender=dataclasses.replace(every3.recommender, checkpoint_every=1))
    assert run_recommender(again, "id", every3.layout.data, None) == stage
    assert read_marker(stage)["finished"] == finished


def test_knowledge_variant_trains_with_ddp_on_user_and_item_knowledge(ray_cluster, asset_home, tmp_path):
    import torch

    from rlrf4rec.core import assets
    from rlrf4rec.stages.encode import write_item_knowledge

    encoder = str(assets.asset_dir("all-minilm-l6-v2", asset_home))
    # Synthetic user vectors (8-d) next to real encoder item vectors (384-d): no shared experts across the dims.
    cfg = _cfg(
        tmp_path, {"item": "metadata"}, {"encoder": encoder}, max_epochs=2, warmup_epochs=1, adaptor_shared_experts=0
    )
    data_dir = run_data(cfg)
    knowledge_dir = cfg.run_path / "knowledge" / "taste"
    from rlrf4rec.core.artifacts import stage_output

    # Give the hand-written knowledge file a completion marker, as the encode stage would.
    with stage_output(knowledge_dir, "synthetic", "") as (tmp, _):
        (knowledge_dir / "user_knowledge.parquet").rename(tmp / "user_knowledge.parquet")
    items_dir = write_item_knowledge(cfg)  # the encode stage's item half: one metadata text per item, encoded
    stage = run_recommender(cfg, "taste", data_dir, knowledge_dir / "user_knowledge.parquet")
    stats = read_marker(stage)["stats"]
    assert stats["epochs_run"] == 2 and stats["resumed_after"] == []
    assert {"valid/ndcg@5", "valid/map@5", "valid/ndcg@1", "valid/map@7"} <= set(stats)
    assert stats["knowledge"] == ["item", "user"] and read_marker(items_dir)["stats"]["items"] == 80
    saved = torch.load(stage / "model.pt", weights_only=False)
    assert saved["knowledge_dims"] == {"user": 8, "item": 384} and saved["item_knowledge"].shape == (81, 384)
    assert (saved["item_knowledge"][0] == 0).all() and (saved["item_knowledge"][1:].norm(dim=1) > 0.99).all()


def test_zero2_trains_like_ddp_and_resumes_from_its_partitions(ray_cluster, tmp_path):
    """ZeRO-2 with its last worker killed after epoch 1 ends with the history of plain DDP never killed: the
    optimizer partitions and the random state come back from the checkpoint; the arithmetic differs only in
    rounding."""
    histories = {}
    for name, extra in (("ddp", {}), ("zero2-killed", {"deepspeed": "zero2"})):
        cfg = _cfg(tmp_path / name, **extra)
        if extra:
            cfg = _with_fault(cfg, epoch=1)
        stage = run_recommender(cfg, "id", run_data(cfg), None)
        histories[name] = json.loads((stage / "history.json").read_text())
        partitions = {f.name for f in (cfg.run_path / "ray_train").rglob("zero_pp_rank_*_optim_states.pt")}
        # ZeRO-2 really ran: each of the 2 workers checkpointed its own optimizer partition (DDP: none).
        assert partitions == ({f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} if extra else set())
    assert _fault_markers(cfg)  # the last ZeRO-2 worker really SIGKILLed itself
    stats = read_marker(stage)["stats"]
    assert len(stats["resumed_after"]) == 1 and stats["resumed_after"][0] in (0, 1)
    assert [h["epoch"] for h in histories["zero2-killed"]] == [0, 1, 2, 3]
    # Same seeds, same data order, same AdamW; after the restart the weights, the optimizer partitions and each
    # worker's dropout stream come back from the checkpoint: DDP's numbers in every epoch, up to rounding.
    for ddp, zero in zip(histories["ddp"], histories["zero2-killed"], strict=True):
        assert zero["train/loss"] == pytest.approx(ddp["train/loss"], rel=1e-4)
        assert zero["valid/ndcg@5"] == pytest.approx(ddp["valid/ndcg@5"], abs=1e-3)


@pytest.mark.parametrize("backbone", ["setrank"])
def test_other_backbones_train_under_ray_train(ray_cluster, tmp_path, backbone):
    """SetRank trains like PRM on 2 DDP workers, a second run reproduces the first exactly, and the saved model
    reloads as the same backbone with the valid metric it reported. The stage does not depend on the backbone:
    ZeRO-2, killing and resuming are tested with PRM above; DLCM (ZeRO-2, killed and resumed) and SASRec passed
    the same by hand, and tests/test_recommender.py trains and reloads every backbone in process."""
    from rlrf4rec.core.artifacts import read_tables
    from rlrf4rec.core.recommender import load_checkpoint

    cfg = _cfg(tmp_path, backbone=backbone, max_epochs=3)
    data_dir = run_data(cfg)
    stage = run_recommender(cfg, "id", data_dir, None)
    stats = read_marker(stage)["stats"]
    assert stats["resumed_after"] == [] and stats["epochs_run"] == 3
    assert [h["epoch"] for h in json.loads((stage / "history.json").read_text())] == [0, 1, 2]
    loaded = load_checkpoint(stage, read_tables(data_dir))
    assert loaded.task.spec.backbone == backbone
    assert type(loaded.model).__name__ == {"setrank": "SetRank", "dlcm": "DLCM"}[backbone]
    valid = loaded.task.evaluate(loaded.model, "valid", loaded.knowledge(None))["valid/ndcg@5"]
    assert valid == pytest.approx(stats["valid/ndcg@5"], abs=1e-6)
    if backbone == "setrank":  # reproducible: the same config, seed and threads in another run directory
        again = _cfg(tmp_path / "again", backbone=backbone, max_epochs=3)
        repeat = run_recommender(again, "id", run_data(again), None)

        def untimed(stage_dir):
            history = json.loads((stage_dir / "history.json").read_text())
            return [{k: v for k, v in h.items() if "seconds" not in k} for h in history]

        assert untimed(repeat) == untimed(stage)  # exactly: every loss and metric of every epoch


def test_workers_keep_rays_info_lines_off_the_console_but_not_warnings_or_their_own(tmp_path):
    """The filter a worker's train loop runs under without --verbose: Ray's records below WARNING are dropped, by the
    file they come from (Ray Train's per-report logger is named after its path); Ray's warnings and the stage's own
    lines pass."""
    import logging

    import ray.train.v2._internal.execution.context as ray_context

    from rlrf4rec.core import launcher

    def record(pathname: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(pathname, level, pathname, 1, "message", None, None)

    keep = launcher._RayInfo()
    assert not keep.filter(record(ray_context.__file__, logging.INFO))
    assert keep.filter(record(ray_context.__file__, logging.WARNING))
    assert keep.filter(record(launcher.__file__, logging.INFO))
    # `ray job submit --working-dir .` unpacks the project under Ray's session directory: still the stage's own.
    unpacked = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_1/rlrf4rec/core/recommender.py"
    assert keep.filter(record(unpacked, logging.INFO))
    # Installed on the root logger's handlers before the loop runs (here on a handler of the test's own, in place of
    # pytest's, which must not keep the filter).
    root, handler = logging.getLogger(), logging.StreamHandler()
    saved, root.handlers = root.handlers[:], [handler]
    try:
        seen = []
        launcher._worker_entry(lambda config: seen.append([type(f) for f in handler.filters]), True, {})
        assert seen == [[launcher._RayInfo]]
    finally:
        root.handlers = saved


def test_printing_into_a_redirected_stdout_stays_there_in_a_quiet_worker(ray_cluster, tmp_path):
    """Ray Train's own print also logs what is printed into a redirected stdout; dill's disassembly for datasets'
    fingerprints (TRL's DPO set-up) filled the console with bytecode that way. A quiet worker captures it only."""
    import logging

    from rlrf4rec.core import launcher

    def loop(config):
        import contextlib
        import io
        import logging

        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        logging.getLogger().addHandler(Keep())
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            print("disassembly goes here")
        if buffer.getvalue() != "disassembly goes here\n" or any("disassembly" in r for r in records):
            raise AssertionError(f"captured {buffer.getvalue()!r}, logged {records}")

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # not --verbose
    try:
        launcher.fit_on_ray(loop, {}, launcher.Fit("print", tmp_path / "storage", 1, False, 0))
    finally:
        root.setLevel(level)

"""Scoring on a 2-node local Ray cluster (ray.cluster_utils): work lands on both nodes, and removing one node in the
middle of the stage loses no row: every reward comes back once and equals in-process scoring."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_a_node_removed_mid_stage_loses_no_row(serving_run, asset_home, tmp_path):
    import functools

    import pyarrow as pa
    import ray
    from ray.cluster_utils import Cluster

    from rlrf4rec.core import assets
    from rlrf4rec.core import schema as S
    from rlrf4rec.core.knowledge import TextEncoder
    from rlrf4rec.core.scoring import RewardModel
    from rlrf4rec.stages.reward import score_on_ray

    class NodeRecordingEncoder:  # local: shipped to the actors by value
        """The real sentence encoder; each actor notes the node it runs on (a file per actor) before loading it."""

        def __init__(self, encoder_dir: str, marks: str):
            import ray

            from rlrf4rec.core.knowledge import TextEncoder

            self.node = ray.get_runtime_context().get_node_id()
            self.marks = Path(marks)
            (self.marks / f"{self.node}-{os.getpid()}").touch()
            self.encoder = TextEncoder(encoder_dir, max_length=64)
            self.calls = 0

        def encode(self, texts):
            out = self.encoder.encode(texts)
            self.calls += 1  # one file per encoded batch: proof that this node is working through rows
            (self.marks / "batches" / f"{self.node}-{os.getpid()}-{self.calls}").touch()
            return out

    run, tastes = serving_run
    encoder_dir = str(assets.asset_dir("all-minilm-l6-v2", asset_home))
    users = sorted(tastes) * 3  # 1,200 rows, each user three times with other words
    moods = ["Loves genre A movies.", "Loves genre B movies.", "Watches anything."]
    texts = [f"Preferences: {moods[i % 3]}\nHistory: {u}" for i, u in enumerate(users)]
    recommender, data_dir = run / "recommender" / "base", run / "data"
    expected = RewardModel.load(recommender, data_dir).score(
        users, TextEncoder(encoder_dir, max_length=64).encode(texts)
    )

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    marks = tmp_path / "marks"
    (marks / "batches").mkdir(parents=True)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        rows = pa.table({S.USER_ID: users, S.KNOWLEDGE_TEXT: texts})
        make_encoder = functools.partial(NodeRecordingEncoder, encoder_dir, str(marks))
        result: dict = {}

        def stage():
            try:
                result["rewards"] = score_on_ray(
                    rows, make_encoder, recommender, data_dir, "ndcg@5", batch_size=16, concurrency=2
                )
            except BaseException as e:  # surfaced by the assertion below
                result["error"] = e

        thread = threading.Thread(target=stage)
        thread.start()
        def nodes_with_batches() -> set[str]:
            return {p.name.split("-")[0] for p in (marks / "batches").iterdir()}

        deadline = time.monotonic() + 300
        while len(nodes_with_batches()) < 2 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.node_id in nodes_with_batches(), "the worker node encoded no batch: nothing of it to lose"
        assert thread.is_alive(), "the stage finished before the node could be removed; give it more rows"
        done_on_worker = len([p for p in (marks / "batches").iterdir() if p.name.startswith(worker.node_id)])
        cluster.remove_node(worker)  # mid-stream: it has encoded batches and the stage still has rows to score
        thread.join(timeout=600)
        assert not thread.is_alive() and "error" not in result, result.get("error")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert done_on_worker >= 1
    np.testing.assert_allclose(result["rewards"], expected, rtol=0, atol=1e-6)

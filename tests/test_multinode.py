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
    from rlrf4rec.stages.encode import TextEncoder
    from rlrf4rec.stages.reward import RewardModel, score_on_ray

    class NodeRecordingEncoder:  # local: shipped to the actors by value
        """The real sentence encoder; each actor notes the node it runs on (a file per actor) before loading it."""

        def __init__(self, encoder_dir: str, marks: str):
            import ray

            from rlrf4rec.stages.encode import TextEncoder

            node = ray.get_runtime_context().get_node_id()
            (Path(marks) / f"{node}-{os.getpid()}").touch()
            self.encoder = TextEncoder(encoder_dir, max_length=64)

        def encode(self, texts):
            return self.encoder.encode(texts)

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
    marks.mkdir()
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
        deadline = time.monotonic() + 300
        while len({p.name.split("-")[0] for p in marks.iterdir()}) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        nodes_used = {p.name.split("-")[0] for p in marks.iterdir()}
        assert len(nodes_used) == 2, "the stage did not use both nodes"
        time.sleep(3)  # both actors are scoring now
        assert thread.is_alive(), "the stage finished before the node could be removed; give it more rows"
        cluster.remove_node(worker)
        thread.join(timeout=600)
        assert not thread.is_alive() and "error" not in result, result.get("error")
    finally:
        ray.shutdown()
        cluster.shutdown()
    np.testing.assert_allclose(result["rewards"], expected, rtol=0, atol=1e-6)

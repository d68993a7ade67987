"""On-line re-ranking core: versions of a run, knowledge lookup, windowed list-wise scoring, both paths."""

import numpy as np
import pytest
import torch
from synthetic import NUM_ITEMS, preference

from rlrf4rec.core.artifacts import MARKER, write_json
from rlrf4rec.core.layout import RunLayout
from rlrf4rec.serving import online

GENRE_A = [str(i) for i in range(1, NUM_ITEMS // 2 + 1)]
GENRE_B = [str(i) for i in range(NUM_ITEMS // 2 + 1, NUM_ITEMS + 1)]


def _complete(path):
    path.mkdir(parents=True)
    write_json({"fingerprint": "x", "stage": path.name, "stats": {}}, path / MARKER)


def test_latest_version_is_the_last_round_of_the_manifest(tmp_path, monkeypatch):
    """Versions are base and the rounds the loop recorded; a round still being written (its directories there, not
    yet in the manifest) is not served, and a round's policy is its fit's model in this run directory."""
    from rlrf4rec.core.lineage import Round

    monkeypatch.setattr(online, "start_policy", lambda cfg: "the start policy")
    monkeypatch.setattr(online, "run_config", lambda run_dir: None)
    for v in ("base", "round1", "round2"):
        _complete(tmp_path / "recommender" / v)
        _complete(tmp_path / "knowledge" / v)
    _complete(tmp_path / "recommender" / "round3")  # a round still being written
    rounds = [
        Round(0, "dpo", "p0", "/elsewhere/dpo/round0/model", "r0", "r1"),
        Round(1, "grpo", "p1", "p2", "r1", "r2"),
    ]
    (tmp_path / "rounds").mkdir()
    write_json({"rounds": [r.to_dict() for r in rounds]}, tmp_path / "rounds" / "manifest.json")
    version = online.resolve_version(tmp_path, "latest")
    assert version.name == "round2" and version.policy == str(tmp_path / "grpo" / "round1" / "model")
    assert version.knowledge == tmp_path / "knowledge" / "round2"
    assert online.resolve_version(tmp_path, "round1").policy == str(tmp_path / "dpo" / "round0" / "model")
    assert online.resolve_version(tmp_path, "base").policy == "the start policy"
    with pytest.raises(FileNotFoundError, match="'round3' is not a complete round.*choose another version"):
        online.resolve_version(tmp_path, "round3")
    with pytest.raises(ValueError, match="'latest', 'base' or 'round<t>'"):
        online.resolve_version(tmp_path, "newest")
    (tmp_path / "knowledge" / "round2" / MARKER).unlink()
    with pytest.raises(FileNotFoundError, match="round2.*choose another version"):
        online.resolve_version(tmp_path, "latest")


def test_a_damaged_version_is_refused_in_one_line_naming_the_file_and_the_repair(serving_run, tmp_path):
    """The issue a user met: a truncated knowledge table passed as complete and Serve died in Ray tracebacks. Now the
    version is refused before any replica starts, naming the file and the command that rebuilds it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(serving_run[0], run)
    online.resolve_version(run, "latest")  # a copy (new modification times) is still whole
    table = run / "knowledge" / "round1" / "user_knowledge.parquet"
    table.write_bytes(table.read_bytes()[:1000])
    with pytest.raises(ValueError) as err:
        online.resolve_version(run, "latest")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"version 'round1' is damaged: {table}: 1000 bytes")
    assert f"rlrf4rec run --config {run / 'data' / 'config.yaml'}" in message


@pytest.fixture(scope="module")
def reranker(serving_run):
    run, tastes = serving_run
    version = online.resolve_version(run, "latest")
    index = RunLayout(run).serving_index(version.name)
    return online.Reranker(run, version), online.KnowledgeStore(version, index), tastes


def test_knowledge_decides_the_ranking_when_history_says_nothing(reranker):
    model, store, tastes = reranker
    candidates = GENRE_A[:10] + GENRE_B[:10]
    liked_share = {"knowledge": [], "id": []}
    for user, taste in sorted(tastes.items())[:40]:
        liked = set(GENRE_A if taste == 0 else GENRE_B)
        # The user's precomputed knowledge is found by id; without an id (and the same empty history) it is not.
        with_k, id_only = model.score([online.Query(candidates, user, []), online.Query(candidates, None, [])])
        assert (with_k.model_version, id_only.model_version) == ("round1", "id")
        assert with_k.knowledge.text == store.get(user).text and id_only.knowledge is None
        for path, ranked in (("knowledge", with_k), ("id", id_only)):
            top = online.top_k(candidates, ranked.scores, 10)
            liked_share[path].append(sum(item in liked for item, _ in top) / 10)
    assert np.mean(liked_share["knowledge"]) >= 0.9
    assert 0.2 <= np.mean(liked_share["id"]) <= 0.8  # the ID-only model cannot know the taste
    assert store.get(user).text.startswith("Preferences: " + preference(taste, wording=1))


def test_windows_are_independent_lists_and_batching_changes_nothing(reranker):
    model, _, _ = reranker
    user = "u3"
    candidates = GENRE_A[:13] + GENRE_B[:12]  # 25 = windows of 10, 10 and 5
    (whole,) = model.score([online.Query(candidates, user)])
    assert whole.scores.shape == (25,)
    for lo in (0, 10, 20):
        (alone,) = model.score([online.Query(candidates[lo : lo + 10], user)])
        np.testing.assert_allclose(whole.scores[lo : lo + 10], alone.scores, rtol=1e-5, atol=1e-6)
    window = [item for item, _ in model.catalog.window(user)]
    batched = model.score(
        [online.Query(GENRE_B[:7], "u5"), online.Query(candidates, user), online.Query(candidates, None, window)]
    )
    np.testing.assert_allclose(batched[1].scores, whole.scores, rtol=1e-5, atol=1e-6)
    assert batched[2].model_version == "id" and not np.allclose(batched[2].scores, whole.scores)


def test_one_window_equals_the_model_on_the_list(reranker):
    model, store, _ = reranker
    user, candidates = "u7", GENRE_B[:10]
    (ranked,) = model.score([online.Query(candidates, user)])
    idx = torch.tensor([[model.catalog.index[c] for c in candidates]])
    history = [model.catalog.index[i] for i, _ in model.catalog.window(user)][-model.knowledge_model.history_len :]
    with torch.inference_mode():
        direct = model.knowledge_model.ckpt.model(
            idx,
            model.task.item_genres[idx],
            knowledge=torch.from_numpy(store.get(user).vector)[None],
            history=torch.tensor([history]),
        )[0].numpy()
    np.testing.assert_allclose(ranked.scores, direct, rtol=1e-5, atol=1e-6)


def test_stored_history_window_is_the_default(reranker):
    model, _, _ = reranker
    user, candidates = "u11", GENRE_A[:5] + GENRE_B[:5]
    window = [item for item, _ in model.catalog.window(user)]
    a, b = model.score([online.Query(candidates, user, None), online.Query(candidates, user, window)])
    np.testing.assert_array_equal(a.scores, b.scores)


def test_load_version_swaps_model_and_knowledge_together(serving_run):
    run, _ = serving_run
    model = online.Reranker(run, online.resolve_version(run, "base"))
    id_model = model.id_model
    query = online.Query(GENRE_A[:10], "u1")
    (before,) = model.score([query])
    model.load_version(online.resolve_version(run, "round1"))
    (after,) = model.score([query])
    assert (before.model_version, after.model_version) == ("base", "round1") and model.id_model is id_model
    assert (before.knowledge.version, after.knowledge.version) == ("base", "round1")
    assert before.knowledge.text != after.knowledge.text  # round1's own text, not base's
    assert not np.allclose(before.scores, after.scores)
    # Knowledge offered with the query is read when it is of the model's version...
    own = online.Knowledge("offered", after.knowledge.vector[::-1].copy(), "round1", source="generated")
    (offered,) = model.score([online.Query(GENRE_A[:10], "u1", None, own)])
    assert offered.knowledge is own and not np.allclose(offered.scores, after.scores)
    # ... and never when it is another version's: the ID-only model answers.
    stale = online.Knowledge("old", before.knowledge.vector, "base", source="generated")
    (refused,) = model.score([online.Query(GENRE_A[:10], "u1", None, stale)])
    (id_only,) = model.score([online.Query(GENRE_A[:10], None, [i for i, _ in model.catalog.window("u1")])])
    assert refused.model_version == "id" and refused.knowledge is None
    np.testing.assert_array_equal(refused.scores, id_only.scores)


def test_top_k_is_stable_on_ties():
    assert online.top_k(["a", "b", "c"], np.array([1.0, 2.0, 1.0]), 3) == [("b", 2.0), ("a", 1.0), ("c", 1.0)]

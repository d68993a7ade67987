"""Knowledge that moves rankings: segments, item knowledge, user x item interaction, ListNet, and the controls."""

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from synthetic import write_dataset

from rlrf4rec.core import assets
from rlrf4rec.core import engines as E
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_parquet, read_tables
from rlrf4rec.core.config import RunConfig, from_dict
from rlrf4rec.core.knowledge import pad_segments, text_segments
from rlrf4rec.core.metrics import list_mean, paired_list_mean_ci
from rlrf4rec.core.models import PRM, KnowledgeAdaptor, listnet_loss
from rlrf4rec.core.recommender import (
    ModelSpec,
    RerankTask,
    load_checkpoint,
    save_checkpoint,
    train_model,
)
from rlrf4rec.core.scoring import item_knowledge_matrix
from rlrf4rec.stages import generate as G
from rlrf4rec.stages.controls import leaked_texts, per_user, perturb_user_knowledge
from rlrf4rec.stages.data import run_data
from rlrf4rec.stages.encode import run_encode, write_item_knowledge


def test_listnet_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [1.0, 1.0, float("-inf")], [0.5, 0.1, 0.2]])
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    # List 2 has no positive: left out. List 1: target (1/2, 1/2, 0); list 3: target (0, 1, 0).
    z1 = math.log(math.exp(2) + 1 + math.exp(-1))
    z3 = math.log(math.exp(0.5) + math.exp(0.1) + math.exp(0.2))
    expected = ((-0.5 * (2 - z1) - 0.5 * (0 - z1)) + -(0.1 - z3)) / 2
    assert listnet_loss(logits, labels, mask).item() == pytest.approx(expected, rel=1e-6)
    assert listnet_loss(logits[1:2], labels[1:2], mask[1:2]).item() == 0.0  # no positive anywhere: zero, no NaN


def test_text_segments_and_padding():
    text = 'Preferences: likes sci-fi. Dislikes romance!\nHistory: "A" (1995), 5 stars; "B" (1990), 2 stars;'
    assert text_segments(text, 10) == [
        "Preferences: likes sci-fi.",
        "Dislikes romance!",
        'History: "A" (1995), 5 stars;',
        '"B" (1990), 2 stars;',
    ]
    # Over the cap: the head (the preference text) and the tail (the most recent history) are kept.
    assert text_segments(text, 2) == ["Preferences: likes sci-fi.", '"B" (1990), 2 stars;']
    three = ["Preferences: likes sci-fi.", 'History: "A" (1995), 5 stars;', '"B" (1990), 2 stars;']
    assert text_segments(text, 3) == three
    assert text_segments("  ", 4) == ["(empty)"]  # every user has at least one segment
    padded = pad_segments([np.ones((2, 3), np.float32), np.full((1, 3), 2.0, np.float32)])
    assert padded.shape == (2, 2, 3) and (padded[1, 1] == 0).all() and (padded[1, 0] == 2).all()


def _model(item: bool = True, interaction: bool = True, dim: int = 8) -> PRM:
    torch.manual_seed(0)
    types = {"user": dim, "item": dim} if item else {"user": dim}
    return PRM(
        20,
        item_dim=8,
        adaptor=KnowledgeAdaptor(types, 1, 1, 16, 8, 0.0),
        d_model=16,
        dropout=0.0,
        interaction=interaction,
    ).eval()


def _inputs(seed: int, B: int, S: int, C: int, D: int = 8):
    """Seeded candidates [B, C], unit-norm user segments [B, S, D] and item vectors [B, C, D] (as an encoder gives)."""
    g = torch.Generator().manual_seed(seed)
    candidates = torch.randint(1, 21, (B, C), generator=g)
    user = torch.nn.functional.normalize(torch.randn(B, S, D, generator=g), dim=-1)
    item = torch.nn.functional.normalize(torch.randn(B, C, D, generator=g), dim=-1)
    return candidates, user, item


def test_padding_segments_change_no_score_and_item_knowledge_moves_each_candidate():
    model = _model()
    candidates, user, item = _inputs(seed=1, B=3, S=2, C=5)
    with torch.inference_mode():
        base = model(candidates, knowledge={"user": user, "item": item})
        padded = torch.cat([user, torch.zeros(3, 4, 8)], dim=1)  # four padding segments more
        assert torch.allclose(model(candidates, knowledge={"user": padded, "item": item}), base, atol=1e-6)
        # The user's text made identical to one candidate's item text: every list's scores move.
        matched = user.clone()
        matched[:, 0] = item[:, 2]
        moved = (model(candidates, knowledge={"user": matched, "item": item}) - base).abs()
    assert torch.isfinite(base).all() and (moved.sum(1) > 0).all()


def test_interaction_needs_user_knowledge():
    with pytest.raises(ValueError, match="interaction needs an adaptor"):
        PRM(20, adaptor=KnowledgeAdaptor({"item": 8}, 1, 1, 16, 8), interaction=True)


@pytest.fixture(scope="module")
def synthetic_lists(tmp_path_factory):
    """Users whose histories reveal no taste (half liked, half not): only knowledge can tell their lists apart."""
    root = tmp_path_factory.mktemp("knowledge")
    write_dataset(root / "raw", num_users=160, length=24, liked_fraction=0.5)
    cfg = from_dict(
        RunConfig, {"name": "k", "run_dir": str(root / "run"), "data": {"format": "parquet", "path": str(root / "raw")}}
    )
    return read_tables(run_data(cfg))


def _leak_knowledge(task: RerankTask, tables) -> dict[str, torch.Tensor]:
    """The positive control in vector form: one segment per item the user liked in its own lists (a one-hot of
    the item), and each item's knowledge the same one-hot: a text that names the answer, and item texts to match."""
    D = task.num_items + 1
    liked: dict[str, set[int]] = {}
    for r in tables["rerank_lists"].to_pylist():
        liked.setdefault(r[S.USER_ID], set()).update(
            task.item_index[i] for i, y in zip(r[S.CANDIDATE_ITEMS], r[S.LABELS]) if y
        )
    eye = torch.eye(D)
    segments = [eye[sorted(liked.get(u, set())) or [0]].numpy() for u in task.users]
    return {"user": torch.from_numpy(pad_segments(segments)), "item": eye}


def test_positive_control_wins_and_a_shuffled_one_loses(synthetic_lists):
    """The knowledge-sensitivity check: a re-ranker that ignored its knowledge input would score the same with the
    user's own leaked answer, with another user's, and without any."""
    spec = ModelSpec(
        max_epochs=12,
        patience=12,
        batch_size=64,
        lr=2e-3,
        history_len=4,
        dropout=0.0,
        use_history=False,
        interaction=True,
        warmup_epochs=0,
    )
    task = RerankTask(synthetic_lists, spec)
    knowledge = _leak_knowledge(task, synthetic_lists)
    model, _ = train_model(task, knowledge, seed=0)
    id_model, _ = train_model(task, None, seed=0)

    def valid(m, k):
        return list_mean(per_user(task, task.per_list_metrics(m, "valid", k)["ndcg@5"])[1])

    own, id_only = valid(model, knowledge), valid(id_model, None)
    shuffled = valid(model, perturb_user_knowledge(knowledge, task, "shuffled", seed=0))
    assert own > id_only + 0.2, (own, id_only)
    assert own > shuffled + 0.2, (own, shuffled)
    assert own > 0.8  # these lists' ceiling is 1: every valid list here holds a positive


def test_item_knowledge_travels_with_the_checkpoint(synthetic_lists, tmp_path):
    spec = ModelSpec(
        max_epochs=2, patience=2, batch_size=64, history_len=4, dropout=0.0, interaction=True, warmup_epochs=0
    )
    task = RerankTask(synthetic_lists, spec)
    knowledge = _leak_knowledge(task, synthetic_lists)
    model, state = train_model(task, knowledge, seed=0)
    save_checkpoint(tmp_path, state.best_model, spec, knowledge, user_segments=16)
    ckpt = load_checkpoint(tmp_path, synthetic_lists)
    assert ckpt.user_segments == 16 and ckpt.user_knowledge_dim == task.num_items + 1
    assert torch.equal(ckpt.item_knowledge, knowledge["item"])
    reloaded = ckpt.knowledge(knowledge["user"])
    assert np.array_equal(
        ckpt.task.scores(ckpt.model, "valid", reloaded), task.scores(model.eval(), "valid", knowledge)
    )


def test_controls_helpers():
    table = pa.table(
        {
            S.USER_ID: ["a", "a", "b"],
            S.CANDIDATE_ITEMS: [["1", "2"], ["3", "1"], ["2", "3"]],
            S.LABELS: [[1, 0], [1, 1], [0, 0]],
        }
    )
    items = pa.table({S.ITEM_ID: ["1", "2", "3"], S.TITLE: ["One", "Two", "Three"]})
    assert leaked_texts({"rerank_lists": table, "items": items}) == {"a": "Liked: One; Three", "b": "Liked: "}
    # Per-user (sum, count): identical variants differ by exactly 0; a constant shift is resolved.
    a = np.array([[1.5, 2.0], [0.5, 1.0], [2.0, 4.0]])
    assert paired_list_mean_ci(a, a, 200, 0) == [0.0, 0.0, 0.0]
    shifted = a + np.array([[0.2, 0.0], [0.1, 0.0], [0.4, 0.0]])  # +0.1 per list
    diff, low, high = paired_list_mean_ci(shifted, a, 200, 0)
    assert diff == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_shuffled_knowledge_is_a_derangement_of_valid_users(synthetic_lists):
    task = RerankTask(synthetic_lists, ModelSpec())
    user = torch.arange(len(task.users), dtype=torch.float32)[:, None].repeat(1, 3)
    out = perturb_user_knowledge({"user": user}, task, "shuffled", seed=3)["user"]
    rows = task.splits["valid"].user_row.unique()
    assert (out[rows, 0] != user[rows, 0]).all()  # nobody keeps their own
    assert sorted(out[rows, 0].tolist()) == sorted(user[rows, 0].tolist())  # and nobody is lost
    others = torch.ones(len(task.users), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(out[others], user[others])
    mean = perturb_user_knowledge({"user": user}, task, "mean", seed=0)["user"]
    assert torch.allclose(mean[rows], user[task.splits["train"].user_row.unique()].mean(0).expand(len(rows), -1))
    # Segments: one segment, the mean of the train users' real segments; padding stays padding.
    segments = torch.zeros(len(task.users), 3, 2)
    segments[:, 0] = 1.0
    segments[::2, 1] = 3.0  # every other user has a second segment
    out = perturb_user_knowledge({"user": segments}, task, "mean", seed=0)["user"]
    train = segments[task.splits["train"].user_row.unique()].reshape(-1, 2)
    assert torch.allclose(out[rows, 0], train[train.abs().sum(-1) > 0].mean(0).expand(len(rows), -1))
    assert (out[rows, 1:] == 0).all()


def test_spearman_with_ties_and_constant_scores():
    from rlrf4rec.core.audit import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (1.5, 1.5, 3) vs (1, 2, 3) -> Pearson of the ranks
    assert spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])
    assert spearman([0.6, 0.6, 0.6], [1, 2, 3]) is None  # all tied: no order to agree on


def test_paired_differences_resolve_a_shift_and_not_noise():
    from rlrf4rec.core.metrics import RANKED_METRICS as METRICS
    from rlrf4rec.stages.evaluate import paired_differences

    rng = np.random.default_rng(0)
    base = {m: rng.uniform(0.3, 0.9, 200) for m in METRICS}
    rows = {
        "KAR ID-only": base,
        "shifted": {m: v + 0.05 for m, v in base.items()},
        "noise": {m: v + rng.normal(0, 0.05, 200) for m, v in base.items()},
    }
    out = paired_differences(rows, 500, seed=0)
    d, low, high, resolved = out["shifted"]["KAR ID-only"]["ndcg@5"]
    assert d == pytest.approx(0.05) and resolved and low == pytest.approx(0.05) and high == pytest.approx(0.05)
    d, low, high, resolved = out["noise"]["KAR ID-only"]["ndcg@5"]
    assert low < 0 < high and not resolved
    assert "KAR ID-only" not in out.get("KAR ID-only", {})  # no row against itself


def test_fp16_encoder_vectors_feed_an_fp32_model():
    model = _model()
    candidates, user, item = _inputs(seed=2, B=2, S=3, C=4)
    with torch.inference_mode():
        full = model(candidates, knowledge={"user": user, "item": item})
        half = model(candidates, knowledge={"user": user.half(), "item": item.half()})
    assert half.dtype == torch.float32 and torch.allclose(half, full, atol=1e-2)


# --------------------------------------------------------------------------------------------------- LLM knowledge


class SeedEngine:
    """A stand-in LLM: the text says which prompt (item or user history) and which seed it answers."""

    calls: list[int] = []

    def __init__(self, model_path, cfg):
        pass

    def generate(self, prompts, seeds):
        SeedEngine.calls.append(len(prompts))
        out = []
        for p, s in zip(prompts, seeds):
            subject = p.split('Introduce the movie "')[1].split('"')[0] if "Introduce the movie" in p else "a user"
            out.append(E.Completion(f"About {subject}: a calm drama, seed {s}.", 30, 9, "stop"))
        return out


def _llm_cfg(tmp_path, asset_home, **knowledge) -> RunConfig:
    write_dataset(tmp_path / "raw", num_users=24, length=24)
    return from_dict(
        RunConfig,
        {
            "name": "llm",
            "run_dir": str(tmp_path / "run"),
            "assets": {"home": str(tmp_path / "home")},  # the item-text cache goes there
            "models": {
                "llm": str(tmp_path / "no-such-llm"),
                "encoder": str(assets.resolve("embedded:all-minilm-l6-v2", asset_home)),
            },
            "data": {"format": "parquet", "path": str(tmp_path / "raw")},
            "generate": {"engine": "transformers", "num_samples": 3, "batch_size": 8},
            "encode": {"max_length": 64},
            "knowledge": knowledge,
        },
    )


@pytest.fixture
def stand_in_llm(monkeypatch):
    monkeypatch.setattr(G, "chat_renderer", lambda model_path: lambda messages: messages[-1]["content"])
    monkeypatch.setitem(E.ENGINE_CLASSES, "transformers", SeedEngine)
    SeedEngine.calls = []


def test_llm_item_knowledge_is_generated_once_cached_and_fed_per_item(tmp_path, asset_home, stand_in_llm):
    cfg = _llm_cfg(tmp_path, asset_home, item="llm", user="history")
    data_dir = run_data(cfg)
    stage = write_item_knowledge(cfg)
    assert SeedEngine.calls and sum(SeedEngine.calls) == 80  # every item once, in engine batches
    table = read_parquet(stage / "item_knowledge.parquet", S.ITEM_KNOWLEDGE)
    texts = dict(zip(table.column(S.ITEM_ID).to_pylist(), table.column(S.KNOWLEDGE_TEXT).to_pylist()))
    assert texts["7"] == '"Movie 7" (2000). Genres: A.\nAbout Movie 7: a calm drama, seed 0.'  # facts first
    # A second run (another run dir, same LLM and items) reuses the cached descriptions: no generation at all.
    SeedEngine.calls = []
    other = dataclasses.replace(cfg, run_dir=str(tmp_path / "run2"))
    run_data(other)
    assert write_item_knowledge(other) and SeedEngine.calls == []
    assert len(list((tmp_path / "home" / "cache" / "item-texts").iterdir())) == 1
    task = RerankTask(read_tables(data_dir), ModelSpec())
    matrix = item_knowledge_matrix(stage / "item_knowledge.parquet", task)
    assert matrix.shape[0] == task.num_items + 1 and matrix[0].abs().sum() == 0 and (matrix[1:].norm(dim=1) > 0.9).all()


def test_base_knowledge_is_the_base_policys_first_sample_for_train_and_valid_users(tmp_path, asset_home, stand_in_llm):
    cfg = _llm_cfg(tmp_path, asset_home, user="llm", item="none")
    run_data(cfg)
    knowledge = read_parquet(run_encode(cfg) / "user_knowledge.parquet", S.USER_KNOWLEDGE)
    texts = dict(zip(knowledge.column(S.USER_ID).to_pylist(), knowledge.column(S.KNOWLEDGE_TEXT).to_pylist()))
    best_of_n = read_parquet(G.run_generate(cfg) / "generations.parquet", S.GENERATIONS)  # the loop's N samples
    first = {r[S.USER_ID]: r[S.PREFERENCE_TEXT] for r in best_of_n.to_pylist() if r[S.SAMPLE_IDX] == 0}
    sequences = read_parquet(cfg.run_path / "data" / "sequences.parquet", S.SEQUENCES).to_pylist()
    for row in sequences:
        text = texts[row[S.USER_ID]]
        if row[S.SPLIT] == "test":  # theirs are written at evaluation, by each policy
            assert text.startswith("History: ")
        else:  # the same text as the loop's sample 0 of that user: one seed, one prompt
            assert text.startswith(f"Preferences: {first[row[S.USER_ID]]}\nHistory: ")
    assert len(first) == sum(r[S.SPLIT] != "test" for r in sequences)


def test_a_cross_fitted_task_leaves_out_exactly_the_held_out_users_train_lists(synthetic_lists):
    task = RerankTask(synthetic_lists, ModelSpec())
    held = set(task.list_users["train"][:3]) | {"not-a-user"}
    fold = task.without_train_users(held)
    assert held.isdisjoint(fold.list_users["train"])
    assert len(fold.splits["train"]) == len(task.splits["train"]) - sum(u in held for u in task.list_users["train"])
    assert fold.splits["valid"] is task.splits["valid"] and fold.list_users["valid"] == task.list_users["valid"]
    rows = [i for i, u in enumerate(task.list_users["train"]) if u not in held]
    assert torch.equal(fold.splits["train"].candidates, task.splits["train"].candidates[rows])
    assert len(task.splits["train"]) == len(task.list_users["train"])  # the original is untouched


def test_controls_compare_backbones_side_by_side_and_the_report_shows_each(tmp_path, asset_home, capsys):
    """`rlrf4rec controls --backbones prm,sasrec`: one table per backbone with every NDCG/MAP@k, SASRec without the
    history-free rows, a side-by-side table on stdout, and one report block per backbone plus the joint table."""
    import json

    from rlrf4rec.cli import main
    from rlrf4rec.stages.report import build_report

    write_dataset(tmp_path / "raw", num_users=40, length=24)
    encoder = str(assets.resolve("embedded:all-minilm-l6-v2", asset_home))
    common = [
        "--config", "configs/ml100k-cpu.yaml", f"--run_dir={tmp_path}/run", "--data.format=parquet",
        f"--data.path={tmp_path}/raw", "--data.max_train_users=null", f"--models.encoder={encoder}",
        "--knowledge.user=history", "--recommender.max_epochs=2", "--recommender.warmup_epochs=1",
        "--encode.max_length=64",
    ]  # fmt: skip
    assert main(["data", *common]) == 0
    variants = "KAR ID-only;ID + history;history text + ID history"
    rc = main(["controls", *common, "--seeds=2", f"--variants={variants}", "--backbones=prm,sasrec", "--name=bb"])
    out = capsys.readouterr().out
    assert rc == 0
    tables = {b: json.loads((tmp_path / f"run/controls/bb-{b}/table.json").read_text()) for b in ("prm", "sasrec")}
    assert [r["variant"] for r in tables["prm"]] == ["KAR ID-only", "ID + history", "history text + ID history"]
    assert [r["variant"] for r in tables["sasrec"]] == ["ID + history", "history text + ID history"]
    for b, rows in tables.items():
        for r in rows:
            assert r["backbone"] == b and len(r["seed_means"]) == 2
            assert set(r["metrics"]) >= {f"{m}@{k}" for m in ("ndcg", "map") for k in (1, 3, 5, 7)}
            assert r["metrics"]["ndcg@5"] == pytest.approx(r["ndcg@5"])  # the same list means, two ways
            assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    side_by_side = [line for line in out.splitlines() if line.startswith("| prm |") or line.startswith("| sasrec |")]
    assert len(side_by_side) == 5
    md = (build_report(tmp_path / "run") / "report.md").read_text()
    for b in ("prm", "sasrec"):
        assert f"## Knowledge controls: bb-{b} (backbone {b})" in md
    assert "## Re-ranker backbones side by side" in md and md.count("| sasrec | ") == 2
    # Lists of other data settings than the config's are refused, not silently used.
    assert main(["controls", *common, "--data.max_train_users=10", "--seeds=1", "--name=stale"]) == 2
    assert not (tmp_path / "run/controls/stale").exists()


def test_pairwise_log_likelihood_by_hand():
    from rlrf4rec.core.metrics import pairwise_log_likelihood

    scores = np.array([[2.0, 1.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    labels = np.array([[1, 0, 1, 0], [0, 0, 0, 0]])
    mask = np.array([[True, True, True, False], [True, True, True, True]])  # the 5.0 is padding: in no pair

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    got = pairwise_log_likelihood(scores, labels, mask)
    assert got == pytest.approx([(log_sigmoid(2 - 1) + log_sigmoid(0 - 1)) / 2, 0.0])  # pairs (0,1), (2,1); none
    # Smooth where NDCG is not: raising either positive, without changing the order, raises it.
    for i in (0, 2):
        raised = scores.copy()
        raised[0, i] += 0.3
        assert pairwise_log_likelihood(raised, labels, mask)[0] > got[0]
    assert np.isfinite(pairwise_log_likelihood(np.array([[1e4, -1e4]]), np.array([[0, 1]]))).all()


def test_reward_reliability_reports_each_reward_definition_and_seed_ensembles(tmp_path, asset_home):
    """`controls --reliability` on tiny synthetic data, 6 seeds: the configured NDCG reward and the smooth pairwise one
    read from the same models, in-sample and cross-fitted (the config's folds), and ensembles of 2 and 3 seeds
    compared, each beside its Spearman-Brown prediction from one pair of seeds."""
    import json

    from rlrf4rec.cli import main
    from rlrf4rec.core.artifacts import read_marker, stage_output, write_parquet

    write_dataset(tmp_path / "raw", num_users=40, length=24)
    encoder = str(assets.resolve("embedded:all-minilm-l6-v2", asset_home))
    common = [
        "--config", "configs/ml100k-cpu.yaml", f"--run_dir={tmp_path}/run", "--data.format=parquet",
        f"--data.path={tmp_path}/raw", "--data.max_train_users=null", f"--models.encoder={encoder}",
        "--knowledge.user=history", "--knowledge.item=none", "--recommender.max_epochs=1",
        "--recommender.warmup_epochs=0",
        "--encode.max_length=64",
    ]  # fmt: skip
    assert main(["data", *common]) == 0
    lists = read_parquet(tmp_path / "run/data/rerank_lists.parquet")
    train_users = sorted({u for u, s in zip(lists["user_id"].to_pylist(), lists["split"].to_pylist()) if s == "train"})
    texts = ["I like calm dramas.", "Loud action films.", "Anything with music.", "Genre A, never genre B."]
    rows = [
        {
            S.USER_ID: u, S.SAMPLE_IDX: i, S.SPLIT: "train", S.PROMPT: "p", S.PREFERENCE_TEXT: t, S.PROMPT_TOKENS: 1,
            S.COMPLETION_TOKENS: 5, S.FINISH_REASON: "stop", S.SEED: i, S.TEMPERATURE: 1.0, S.TOP_P: 1.0,
            S.MAX_NEW_TOKENS: 8, S.MODEL: "m", S.POLICY_VERSION: "base", S.FLAGS: [],
        }
        for u in train_users[:8]
        for i, t in enumerate(texts)
    ]  # fmt: skip
    gen_dir = tmp_path / "run/generate"
    with stage_output(gen_dir, "hand-written", "") as (tmp, _):
        write_parquet(pa.Table.from_pylist(rows, schema=S.GENERATIONS), tmp / "generations.parquet", S.GENERATIONS)
    reliability = [f"--reliability={gen_dir}", "--seeds=6", "--name=r"]
    assert main(["controls", *common, "--reward.cross_fit_folds=3", *reliability]) == 0
    result = json.loads((tmp_path / "run/controls/reliability-r/reliability.json").read_text())
    assert result["train_users"] == 8 and result["texts"] == 32
    assert set(result["metrics"]) == {"ndcg@5", "pairwise"}
    assert result["in_sample"] == result["metrics"]["ndcg@5"]["in_sample"]  # the configured reward up front
    for ways in result["metrics"].values():
        ensembles = {f"{way}_ensemble{k}" for way in ("in_sample", "cross_fit") for k in (2, 3)}
        assert set(ways) == {"in_sample", "cross_fit", *ensembles}
        assert ways["cross_fit"]["folds"] == 3
        for way in ("in_sample", "cross_fit"):
            r = ways[way]["spearman_mean"]
            for k in (2, 3):
                if r is not None:
                    assert ways[f"{way}_ensemble{k}"]["spearman_brown"] == pytest.approx(k * r / (1 + (k - 1) * r))
        for stats in ways.values():
            assert 0.0 <= stats["tied_share"] <= 1.0
            assert stats["spearman_mean"] is None or -1.0 <= stats["spearman_mean"] <= 1.0
            assert len(stats["spearman_per_user"]) == 8
            if stats["spearman_defined_users"] > 1:
                low, high = stats["spearman_ci"]
                assert low <= stats["spearman_mean"] <= high
    # The smooth reward cannot tie more users than NDCG does on the same models.
    assert result["metrics"]["pairwise"]["in_sample"]["tied_share"] <= result["in_sample"]["tied_share"]
    stats = read_marker(tmp_path / "run/controls/reliability-r")["stats"]
    assert "pairwise/cross_fit_ensemble2/spearman_mean" in stats and "in_sample/tied_share" in stats


def test_signal_audit_runs_on_tiny_data_and_skips_when_complete(tmp_path, asset_home, stand_in_llm, capsys):
    """`controls --signal` end to end (stand-in LLM, history knowledge): N texts per valid user, two disjoint
    judges on disjoint halves of each user's lists, every table entry present; a second call reuses it."""
    import json

    from rlrf4rec.cli import main
    from rlrf4rec.core.artifacts import read_marker
    from rlrf4rec.stages.signal import list_halves

    write_dataset(tmp_path / "raw", num_users=40, length=30)
    encoder = str(assets.resolve("embedded:all-minilm-l6-v2", asset_home))
    common = [
        "--config", "configs/ml100k-cpu.yaml", f"--run_dir={tmp_path}/run", "--data.format=parquet",
        f"--data.path={tmp_path}/raw", "--data.max_train_users=null", f"--models.encoder={encoder}",
        f"--models.llm={tmp_path}/no-such-llm", "--generate.engine=transformers", "--knowledge.user=history",
        "--knowledge.item=none", "--recommender.max_epochs=3", "--recommender.warmup_epochs=1",
        "--encode.max_length=64", "--loop.bootstrap_samples=100",
    ]  # fmt: skip
    assert main(["data", *common]) == 0
    signal = ["controls", *common, "--signal", "--samples=4", "--seeds=2", "--name=t"]
    assert main(signal) == 0
    result = json.loads((tmp_path / "run/controls/signal-t/audit.json").read_text())
    task = RerankTask(read_tables(tmp_path / "run/data"), ModelSpec())
    halves = list_halves(task, seed=2024)
    for a, b in halves.values():  # disjoint halves that cover the user's lists
        assert len(a) and len(b) and not set(a) & set(b)
    assert result["users"] == len(halves) > 0 and result["seeds"] == {"A": [2024], "B": [2025]}
    assert set(result["best_of_n"]) == {"2", "4"} and set(result["features"]) == {
        "words", "truncated", "off_topic", "genre_words", "titles_named"
    }  # fmt: skip
    assert set(result["swaps"]) == {"own", "other user's", "empty", "history template"}
    assert 0.0 <= (result["label_validity"]["mean"] or 0.5) <= 1.0
    texts = read_parquet(tmp_path / "run/controls/signal-texts-base-4/generations.parquet", S.GENERATIONS)
    assert texts.num_rows == 4 * len(set(task.list_users["valid"]))
    assert "label validity" in capsys.readouterr().out
    marker = read_marker(tmp_path / "run/controls/signal-t")
    SeedEngine.calls = []
    assert main(signal) == 0 and SeedEngine.calls == []  # texts and audit complete: nothing regenerated or refit
    assert read_marker(tmp_path / "run/controls/signal-t") == marker

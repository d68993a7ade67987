import numpy as np
import pytest
import torch

from rlrf4rec.core.metrics import rank_metrics
from rlrf4rec.core.models import (
    DLCM,
    PRM,
    ItemPrior,
    KnowledgeAdaptor,
    SASRec,
    SASRecRanker,
    SetRank,
    listwise_bce_loss,
)

torch.set_num_threads(1)

NUM_ITEMS = 20
KNOWLEDGE_DIM = 12


def _adaptor(**kwargs) -> KnowledgeAdaptor:
    return KnowledgeAdaptor({"user": KNOWLEDGE_DIM}, hidden_dim=16, out_dim=8, **kwargs)


def _sasrec(with_knowledge: bool, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    adaptor = _adaptor() if with_knowledge else None
    return SASRec(NUM_ITEMS, hidden_dim=16, num_layers=2, num_heads=2, max_len=8, dropout=0.2, adaptor=adaptor)


def _knowledge(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, KNOWLEDGE_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("with_knowledge", [False, True])
def test_sasrec_left_padding_gives_no_nan(with_knowledge):
    model = _sasrec(with_knowledge).train()  # dropout on: the training path is where NaN hides
    seqs = [
        torch.tensor([[0, 0, 0, 0, 0, 0, 0, 5], [1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 3, 9, 4, 2, 1]]),
        torch.tensor([[7]]),  # a sequence of length 1
    ]
    for seq in seqs:
        knowledge = _knowledge(len(seq), seed=1) if with_knowledge else None
        hidden = model(seq)
        assert torch.isfinite(hidden).all()
        assert (hidden[seq == 0] == 0).all()  # padding outputs zeroed
        scores = model.full_scores(seq, knowledge)
        assert torch.isfinite(scores[:, 1:]).all() and torch.isneginf(scores[:, 0]).all()
        candidates = torch.randint(1, NUM_ITEMS + 1, (len(seq), 4))
        assert torch.isfinite(model.score_candidates(seq, candidates, knowledge)).all()
        targets_all = torch.where(seq != 0, torch.randint(1, NUM_ITEMS + 1, seq.shape), 0)  # [B, L]
        for targets in (seq[:, -1] % NUM_ITEMS + 1, targets_all):
            model.zero_grad()
            loss = model.next_item_loss(seq, targets, knowledge)
            loss.backward()
            assert torch.isfinite(loss)
            for name, p in model.named_parameters():
                assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_sasrec_extra_left_padding_leaves_user_repr_unchanged():
    model = _sasrec(with_knowledge=True).eval()
    short = torch.tensor([[3, 4, 5], [0, 0, 9]])
    long = torch.tensor([[0, 0, 0, 0, 3, 4, 5], [0, 0, 0, 0, 0, 0, 9]])
    knowledge = _knowledge(2, seed=2)
    torch.testing.assert_close(
        model.user_repr(short, knowledge), model.user_repr(long, knowledge), atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        model.full_scores(short, knowledge), model.full_scores(long, knowledge), atol=1e-6, rtol=1e-6
    )


def test_sasrec_rejects_right_padding_empty_rows_and_missing_knowledge():
    model = _sasrec(with_knowledge=False)
    with pytest.raises(ValueError, match="LEFT-padded"):
        model(torch.tensor([[3, 4, 0]]))
    with pytest.raises(ValueError, match="no items"):
        model(torch.tensor([[0, 0, 0], [1, 2, 3]]))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="no KnowledgeAdaptor"):
        model.user_repr(torch.tensor([[1, 2]]), _knowledge(1, seed=0))
    with pytest.raises(ValueError, match="pass knowledge"):
        _sasrec(with_knowledge=True).user_repr(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="padding"):
        model.next_item_loss(torch.tensor([[0, 1, 2]]), torch.tensor([[4, 2, 3]]))


def test_sasrec_training_reduces_loss_and_changes_parameters():
    model = _sasrec(with_knowledge=True)
    # Synthetic users walk items in order (i -> i+1, wrapping), each with its own knowledge vector.
    starts = torch.arange(16)  # [B]
    walk = (starts[:, None] + torch.arange(9)) % NUM_ITEMS + 1  # [B, 9]
    seq, targets = walk[:, :-1], walk[:, 1:]  # [B, 8] each; every position predicts the next item
    knowledge = _knowledge(16, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model.next_item_loss(seq, targets, knowledge)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(np.log(NUM_ITEMS), abs=0.1)  # N(0, 0.02) init: near-uniform softmax
    assert losses[-1] < 0.5 * losses[0]
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_sasrec_knowledge_changes_ordering_and_is_deterministic():
    model = _sasrec(with_knowledge=True).eval()
    seq = torch.tensor([[0, 0, 4, 7, 2]])
    candidates = torch.arange(1, NUM_ITEMS + 1)[None, :]  # [1, 20]
    k_a, k_b = _knowledge(1, seed=10), _knowledge(1, seed=11)
    scores_a = model.score_candidates(seq, candidates, k_a)
    assert torch.equal(scores_a, model.score_candidates(seq, candidates, k_a))
    assert not torch.equal(scores_a.argsort(dim=-1), model.score_candidates(seq, candidates, k_b).argsort(dim=-1))
    torch.testing.assert_close(model.full_scores(seq, k_a)[:, 1:], scores_a)


def _prm_task(batch: int, generator: torch.Generator):
    """Items 1..10 suit taste A, 11..20 taste B; the list mixes 5 of each; the knowledge says the taste."""
    prototypes = torch.randn(2, KNOWLEDGE_DIM, generator=torch.Generator().manual_seed(0))
    taste = torch.randint(0, 2, (batch,), generator=generator)  # [B]
    group_a = torch.stack([torch.randperm(10, generator=generator)[:5] + 1 for _ in range(batch)])
    group_b = torch.stack([torch.randperm(10, generator=generator)[:5] + 11 for _ in range(batch)])
    order = torch.stack([torch.randperm(10, generator=generator) for _ in range(batch)])
    candidates = torch.cat([group_a, group_b], dim=1).gather(1, order)  # [B, 10]
    labels = ((candidates <= 10) == (taste[:, None] == 0)).float()  # [B, 10]
    knowledge = prototypes[taste] + 0.1 * torch.randn(batch, KNOWLEDGE_DIM, generator=generator)
    return candidates, labels, knowledge, prototypes


def test_prm_knowledge_reorders_the_same_list_after_training():
    torch.manual_seed(0)
    model = PRM(NUM_ITEMS, item_dim=8, adaptor=_adaptor(), d_model=16, num_layers=1, num_heads=2, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(60):
        candidates, labels, knowledge, prototypes = _prm_task(32, generator)
        optimizer.zero_grad()
        listwise_bce_loss(model(candidates, knowledge=knowledge), labels, candidates != 0).backward()
        optimizer.step()
    model.eval()
    candidates = torch.arange(1, 11)[None, :] + torch.tensor([[0, 10] * 5])  # [1, 10]: 1, 12, 3, 14, ...
    logits_a = model(candidates, knowledge=prototypes[:1])
    logits_b = model(candidates, knowledge=prototypes[1:])
    assert torch.equal(logits_a, model(candidates, knowledge=prototypes[:1]))  # same text -> same reward
    assert not torch.equal(logits_a.argsort(dim=-1), logits_b.argsort(dim=-1))
    labels_a = (candidates <= 10).float()
    ndcg_right = rank_metrics(logits_a, labels_a, ks=(5,))["ndcg@5"]
    ndcg_wrong = rank_metrics(logits_b, labels_a, ks=(5,))["ndcg@5"]
    assert ndcg_right[0] == pytest.approx(1.0) and ndcg_wrong[0] == pytest.approx(0.0)


def test_prm_short_lists_attributes_history_give_finite_loss_and_grads():
    torch.manual_seed(0)
    model = PRM(
        NUM_ITEMS,
        item_dim=8,
        num_attributes=5,
        attribute_dim=4,
        use_history=True,
        adaptor=_adaptor(),
        d_model=16,
        num_layers=2,
        num_heads=2,
        max_list_len=6,
    ).train()
    candidates = torch.tensor([[3, 5, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6], [9, 0, 0, 0, 0, 0]])  # [3, 6]
    attributes = torch.randint(0, 6, (3, 6, 3))  # [3, 6, 3], 0 = no genre (some candidates have none)
    history = torch.tensor([[0, 0, 4], [1, 2, 3], [0, 0, 0]])  # last user has no history: summary is zeros
    labels = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    logits = model(candidates, attributes, _knowledge(3, seed=4), history)
    assert torch.isfinite(logits[candidates != 0]).all() and torch.isneginf(logits[candidates == 0]).all()
    loss = listwise_bce_loss(logits, labels, candidates != 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="max_list_len"):
        model(torch.ones(1, 7, dtype=torch.long), torch.ones(1, 7, 1, dtype=torch.long), _knowledge(1, 0), history[:1])
    with pytest.raises(ValueError, match="attributes"):
        model(candidates, None, _knowledge(3, seed=4), history)


def test_prm_id_only_scores_follow_the_items_and_eval_turns_dropout_off():
    torch.manual_seed(0)
    model = PRM(NUM_ITEMS, item_dim=8, d_model=16, dropout=0.5)
    candidates = torch.tensor([[4, 8, 15, 16, 0]])
    model.train()
    assert not torch.equal(model(candidates), model(candidates))  # dropout draws differ between calls
    model.eval()
    scores = model(candidates)
    assert torch.equal(scores, model(candidates))
    with torch.no_grad():
        model.item_emb.weight[15] += 1.0  # another item 15: only through its embedding can the score know it
    changed = model(candidates)
    assert changed[0, 2] != scores[0, 2] and torch.isneginf(changed[0, 4])
    with pytest.raises(ValueError, match="no KnowledgeAdaptor"):
        model(candidates, knowledge=_knowledge(1, seed=0))


def test_adaptor_gates_sum_to_one_and_shapes():
    torch.manual_seed(0)
    adaptor = KnowledgeAdaptor({"user": 384, "item": 384})  # defaults: 2 shared + 2 specific, 128 -> 32
    knowledge = {"user": torch.randn(4, 384), "item": torch.randn(4, 10, 384)}  # item knowledge per candidate
    gates = adaptor.gates(knowledge)
    assert gates["user"].shape == (4, 4) and gates["item"].shape == (4, 10, 4)
    for g in gates.values():
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:-1]))
        assert (g > 0).all()
    outputs = adaptor(knowledge)
    assert outputs["user"].shape == (4, 32) and outputs["item"].shape == (4, 10, 32)
    assert adaptor.output_dim == 64
    single = _adaptor()
    x = torch.randn(2, KNOWLEDGE_DIM)
    assert single.concat(single(x)).shape == (2, 8)
    with pytest.raises(ValueError, match="same sentence encoder"):
        KnowledgeAdaptor({"user": 384, "item": 768})
    assert KnowledgeAdaptor({"user": 384, "item": 768}, num_shared_experts=0).output_dim == 64
    with pytest.raises(ValueError, match="differ"):
        single({"item": x})


# --------------------------------------------------------------------------------------------------- backbones

BACKBONES = ("prm", "setrank", "dlcm", "sasrec")


def _reranker(backbone: str, adaptor: KnowledgeAdaptor | None = None, **kwargs):
    """A small re-ranker of each backbone with the same knowledge inputs."""
    if backbone == "sasrec":
        kwargs.pop("item_dim", None)
        kwargs.pop("attribute_dim", None)
        return SASRecRanker(NUM_ITEMS, adaptor=adaptor, d_model=16, num_layers=1, num_heads=2, history_len=8, **kwargs)
    kwargs.setdefault("item_dim", 8)
    if backbone != "dlcm":
        kwargs["num_heads"] = 2
    cls = {"prm": PRM, "setrank": SetRank, "dlcm": DLCM}[backbone]
    return cls(NUM_ITEMS, adaptor=adaptor, d_model=16, num_layers=1, **kwargs)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_learns_a_knowledge_ranking(backbone):
    """The synthetic task where only the knowledge tells which half of the list is relevant: each backbone, trained
    briefly, ranks the right half first for the right text and the wrong half first for the other text."""
    torch.manual_seed(0)
    model = _reranker(backbone, _adaptor(), dropout=0.0, use_history=backbone == "sasrec")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    history = torch.ones(32, 1, dtype=torch.long) if backbone == "sasrec" else None  # the same for every user
    for _ in range(80):
        candidates, labels, knowledge, prototypes = _prm_task(32, generator)
        optimizer.zero_grad()
        logits = model(candidates, knowledge=knowledge, history=history)
        listwise_bce_loss(logits, labels, candidates != 0).backward()
        optimizer.step()
    model.eval()
    candidates = torch.arange(1, 11)[None, :] + torch.tensor([[0, 10] * 5])  # [1, 10]: 1, 12, 3, 14, ...
    one = None if history is None else history[:1]
    labels_a = (candidates <= 10).float()
    ndcg_right = rank_metrics(model(candidates, knowledge=prototypes[:1], history=one), labels_a, ks=(5,))["ndcg@5"]
    ndcg_wrong = rank_metrics(model(candidates, knowledge=prototypes[1:], history=one), labels_a, ks=(5,))["ndcg@5"]
    assert ndcg_right[0] == pytest.approx(1.0) and ndcg_wrong[0] == pytest.approx(0.0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_masks_padding_with_all_knowledge_types(backbone):
    """Segmented user knowledge, per-candidate item knowledge, the match terms, attributes and history: padding
    candidates score -inf, the loss and every gradient are finite."""
    torch.manual_seed(0)
    adaptor = KnowledgeAdaptor({"user": KNOWLEDGE_DIM, "item": KNOWLEDGE_DIM}, hidden_dim=16, out_dim=8)
    model = _reranker(
        backbone, adaptor, num_attributes=5, attribute_dim=4, use_history=True, max_list_len=6, interaction=True
    ).train()
    g = torch.Generator().manual_seed(3)
    candidates = torch.tensor([[0, 0, 0, 3, 5, 7], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9]])  # left-padded, [3, 6]
    attributes = torch.randint(0, 6, (3, 6, 3), generator=g)
    history = torch.tensor([[0, 0, 4], [1, 2, 3], [0, 0, 8]])
    user = torch.randn(3, 4, KNOWLEDGE_DIM, generator=g)
    user[0, 2:] = 0  # padding segments
    knowledge = {"user": user, "item": torch.randn(3, 6, KNOWLEDGE_DIM, generator=g)}
    labels = torch.tensor([[0, 0, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]])
    logits = model(candidates, attributes, knowledge, history)
    assert torch.isfinite(logits[candidates != 0]).all() and torch.isneginf(logits[candidates == 0]).all()
    loss = listwise_bce_loss(logits, labels, candidates != 0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError):
        model(torch.ones(1, 7, dtype=torch.long), attributes[:1], knowledge, history[:1])  # longer than max_list_len


@pytest.mark.parametrize("backbone", ["setrank", "dlcm", "sasrec"])
def test_extra_left_padding_leaves_scores_unchanged(backbone):
    """Where a candidate sits after padding does not matter to the backbones without list positions."""
    torch.manual_seed(0)
    model = _reranker(backbone, use_history=True, max_list_len=8).eval()
    candidates = torch.tensor([[4, 8, 15, 16, 2]])
    history = torch.tensor([[3, 9]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), candidates], dim=1)
    torch.testing.assert_close(model(padded, history=history)[:, 3:], model(candidates, history=history))


@pytest.mark.parametrize("backbone", ["setrank", "sasrec"])
def test_set_backbones_are_permutation_equivariant(backbone):
    torch.manual_seed(0)
    model = _reranker(backbone, use_history=True).eval()
    candidates = torch.tensor([[4, 8, 15, 16, 2, 11]])
    history = torch.tensor([[3, 9]])
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    torch.testing.assert_close(model(candidates[:, perm], history=history), model(candidates, history=history)[:, perm])


def test_dlcm_reads_the_list_in_order_and_prm_by_position():
    """DLCM's GRU and PRM's position embedding make a candidate's score depend on the initial order."""
    for backbone in ("dlcm", "prm"):
        torch.manual_seed(0)
        model = _reranker(backbone).eval()
        candidates = torch.tensor([[4, 8, 15, 16, 2, 11]])
        perm = torch.tensor([5, 2, 0, 4, 1, 3])
        assert not torch.allclose(model(candidates[:, perm]), model(candidates)[:, perm], atol=1e-6), backbone


def test_sasrec_ranker_needs_the_history():
    with pytest.raises(ValueError, match="use_history"):
        SASRecRanker(NUM_ITEMS, use_history=False)
    model = SASRecRanker(NUM_ITEMS, d_model=16, history_len=4)
    with pytest.raises(ValueError, match="history"):
        model(torch.tensor([[1, 2]]))


def test_item_prior_feature_is_the_standardised_leave_user_out_log_count():
    prior = ItemPrior(4)
    counts = torch.tensor([0.0, 9.0, 3.0, 0.0, 1.0])  # row 0: padding
    prior.set_counts(counts)
    log_count = torch.log1p(counts[1:])
    center, scale = log_count.mean(), log_count.std()
    candidates = torch.tensor([[0, 1, 2, 3], [4, 1, 2, 3]])
    own = torch.tensor([[False, True, False, False], [True, False, True, False]])  # the owner is counted there
    expected = torch.tensor(
        [
            [0.0, (np.log1p(8.0) - center) / scale, (np.log1p(3.0) - center) / scale, (0.0 - center) / scale],
            [
                (0.0 - center) / scale,
                (np.log1p(9.0) - center) / scale,
                (np.log1p(2.0) - center) / scale,
                -center / scale,
            ],
        ]
    )
    torch.testing.assert_close(prior.feature(candidates, own), expected.float())
    torch.testing.assert_close(prior.feature(candidates, None)[1, 0], ((np.log1p(1.0) - center) / scale).float())
    with pytest.raises(ValueError, match="num_items"):
        prior.set_counts(torch.zeros(3))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_untrained_rerankers_with_the_item_prior_rank_by_popularity_and_save_it(backbone):
    """Before any training, the prior's unit weight ranks a list by its items' train counts (what a count knows from
    the first step); the counts are buffers, so a model rebuilt from the saved weights ranks the same."""
    torch.manual_seed(0)
    counts = torch.zeros(NUM_ITEMS + 1)
    counts[1:6] = 500.0  # items 1-5 popular, 6-10 never interacted by a train user
    history = torch.tensor([[11, 12]]) if backbone == "sasrec" else None
    model = _reranker(backbone, use_history=backbone == "sasrec", item_prior=True).eval()
    model.prior.set_counts(counts)
    candidates = torch.tensor([[6, 1, 7, 2, 8, 3, 9, 4, 10, 5]])
    labels = (candidates <= 5).float()
    scores = model(candidates, history=history)
    assert rank_metrics(scores, labels, ks=(5,))["ndcg@5"][0] == pytest.approx(1.0)
    torch.manual_seed(1)
    rebuilt = _reranker(backbone, use_history=backbone == "sasrec", item_prior=True).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(candidates, history=history), scores)

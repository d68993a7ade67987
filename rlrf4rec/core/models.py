"""Recommender backbones with KAR knowledge augmentation: a hybrid-expert KnowledgeAdaptor, SASRec, and the
re-rankers PRM, SetRank, DLCM and SASRecRanker (one contract: a candidate list in, one logit per candidate out).

Consumes item indices (1-based, 0 = padding, as rlrf4rec.core.schema.ITEM_IDX), optional attribute indices and optional
knowledge vectors (frozen sentence-encoder embeddings of user / item texts) as tensors; produces hidden states,
scores, logits and losses as tensors. Knows nothing about texts, encoders, files, metrics or how the lists were built.
An ID-only baseline is the same class built with adaptor=None and called with knowledge=None (METHOD.md section 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# One tensor (single knowledge type), a list in the adaptor's type order, or type -> tensor;
# each tensor [B, D_t] (user level) or [B, C, D_t] (per candidate).
Knowledge = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


def _expert(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    # Linear output: the mixture feeds a linear fusion, so a final ReLU would only add dead units.
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim))


class KnowledgeAdaptor(nn.Module):
    """KAR hybrid-expert adaptor: per knowledge type, a softmax gate mixes the shared experts and the type's own.

    input_dims: knowledge type -> embedding dim, e.g. {"user": 384} or {"user": 384, "item": 384}; the order of the
    keys is the order of `concat`. Shared experts see every type, so they need all types to share one dim.
    """

    def __init__(
        self,
        input_dims: Mapping[str, int],
        num_shared_experts: int = 2,
        num_specific_experts: int = 2,
        hidden_dim: int = 128,
        out_dim: int = 32,
        dropout: float = 0.1,
    ):
        super().__init__()
        if not input_dims:
            raise ValueError('input_dims is empty; name at least one knowledge type, e.g. {"user": 384}')
        num_experts = num_shared_experts + num_specific_experts
        if num_shared_experts < 0 or num_specific_experts < 0 or num_experts < 1:
            raise ValueError(
                f"need >= 1 expert in total, got shared={num_shared_experts}, specific={num_specific_experts}"
            )
        dims = sorted(set(input_dims.values()))
        if num_shared_experts > 0 and len(dims) > 1:
            raise ValueError(
                f"shared experts need one input dim for all knowledge types, got {dict(input_dims)}; "
                "encode every type with the same sentence encoder or set num_shared_experts=0"
            )
        self.types = tuple(input_dims)
        self.out_dim = out_dim
        self.shared = nn.ModuleList(_expert(dims[0], hidden_dim, out_dim, dropout) for _ in range(num_shared_experts))
        self.specific = nn.ModuleDict(
            {
                t: nn.ModuleList(_expert(d, hidden_dim, out_dim, dropout) for _ in range(num_specific_experts))
                for t, d in input_dims.items()
            }
        )
        self.gate = nn.ModuleDict({t: nn.Linear(d, num_experts) for t, d in input_dims.items()})
        # Per-type standardisation (identity until `standardize` is called); buffers, so saved with the weights.
        for t, d in input_dims.items():
            self.register_buffer(f"center_{t}", torch.zeros(d))
            self.register_buffer(f"scale_{t}", torch.ones(d))

    def standardize(self, knowledge_type: str, vectors: torch.Tensor) -> None:
        """Centre and scale one type's inputs with statistics of `vectors` [N, D] (the training users').

        Sentence embeddings of similar texts share most of their direction (user history texts here: mean cosine
        0.78, per-dimension spread ~0.02); standardised, the user-specific part reaches the experts at unit scale.
        """
        if knowledge_type not in self.types or vectors.dim() != 2 or len(vectors) < 2:
            raise ValueError(f"standardize needs [N >= 2, D] vectors of a known type {self.types}")
        getattr(self, f"center_{knowledge_type}").copy_(vectors.mean(0))
        getattr(self, f"scale_{knowledge_type}").copy_(vectors.std(0).clamp(min=1e-6))

    @property
    def output_dim(self) -> int:
        return len(self.types) * self.out_dim

    def as_mapping(self, knowledge: Knowledge) -> dict[str, torch.Tensor]:
        """Normalise the accepted knowledge forms to type -> tensor in the adaptor's type order."""
        if isinstance(knowledge, torch.Tensor):
            knowledge = [knowledge]
        if not isinstance(knowledge, Mapping):
            if len(knowledge) != len(self.types):
                raise ValueError(f"got {len(knowledge)} knowledge tensors for types {self.types}; pass a dict")
            knowledge = dict(zip(self.types, knowledge, strict=True))
        if set(knowledge) != set(self.types):
            raise ValueError(f"knowledge types {sorted(knowledge)} differ from the adaptor's {list(self.types)}")
        dtype = self.gate[self.types[0]].weight.dtype
        # The encoder may emit fp16 while the recommender trains in fp32; the cast is exact in that direction.
        return {
            t: (knowledge[t].to(dtype) - getattr(self, f"center_{t}")) / getattr(self, f"scale_{t}") for t in self.types
        }

    def gates(self, knowledge: Knowledge) -> dict[str, torch.Tensor]:
        """type -> gate weights [..., num_shared + num_specific], each row summing to 1."""
        return {t: torch.softmax(self.gate[t](x), dim=-1) for t, x in self.as_mapping(knowledge).items()}

    def forward(self, knowledge: Knowledge) -> dict[str, torch.Tensor]:
        """type -> augmented vector [..., out_dim]."""
        out = {}
        for t, x in self.as_mapping(knowledge).items():  # x [..., D_t]
            experts = torch.stack([e(x) for e in (*self.shared, *self.specific[t])], dim=-2)  # [..., E, out]
            gate = torch.softmax(self.gate[t](x), dim=-1)  # [..., E]
            out[t] = (gate.unsqueeze(-1) * experts).sum(dim=-2)  # [..., out]
        return out

    def concat(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-type outputs with equal leading shape -> [..., output_dim]."""
        return torch.cat([outputs[t] for t in self.types], dim=-1)


def _attention_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """valid [B, L] bool -> allowed [B, L, L] bool (query, key), True = may attend."""
    L = valid.shape[1]
    allowed = valid[:, None, :].expand(-1, L, -1)  # keys must be real items
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    # Every position attends at least to itself: a fully masked row softmaxes over nothing, which is NaN in plain
    # attention and in some SDPA backends (torch's CPU math path happens to return zeros since 2.5).
    return allowed | torch.eye(L, dtype=torch.bool, device=valid.device)


class _Block(nn.Module):
    """Pre-LN transformer block (attention + GELU FFN). Pre-LN trains stably without warm-up, as in SASRec's code."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden dim {dim} is not divisible by num_heads {num_heads}; change one of them")
        self.num_heads = num_heads
        self.attn_dropout = dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape  # x [B, L, D], allowed [B, L, L]
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))  # [B,H,L,Dh]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed.unsqueeze(1), dropout_p=self.attn_dropout if self.training else 0.0
        )  # [B, H, L, Dh]
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(B, L, D)))
        return x + self.dropout(self.ffn(self.ln2(x)))


def _init_weights(module: nn.Module) -> None:
    # RecBole's SASRec init: N(0, 0.02) weights, zero biases; keeps initial logits small and the softmax flat.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])


def _check_knowledge(adaptor: KnowledgeAdaptor | None, knowledge: Knowledge | None) -> None:
    if adaptor is None and knowledge is not None:
        raise ValueError("this model has no KnowledgeAdaptor; pass knowledge=None or build it with adaptor=...")
    if adaptor is not None and knowledge is None:
        raise ValueError(
            "this model was built with a KnowledgeAdaptor; pass knowledge, or build an ID-only model with adaptor=None"
        )


class SASRec(nn.Module):
    """Self-attentive sequential recommender over LEFT-padded item sequences, optionally knowledge-augmented.

    Left padding puts every user's most recent item at position -1, so the user representation is a plain slice.
    Defaults follow RecBole's SASRec (hidden 64, 2 layers, 2 heads, FFN 4x, N(0, 0.02) init, full-softmax CE) with
    dropout 0.2 instead of RecBole's 0.5: on ML-100k leave-one-out (full sort, one seed, Adam lr 2e-3, batch 128,
    60 epochs, every-position CE) 0.2 reached valid NDCG@10 0.106 / HR@10 0.205 and 0.5 reached 0.096 / 0.183.
    """

    def __init__(
        self,
        num_items: int,
        hidden_dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        max_len: int = 50,
        dropout: float = 0.2,
        adaptor: KnowledgeAdaptor | None = None,
    ):
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden_dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden_dim)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.final_ln = nn.LayerNorm(hidden_dim)
        self.apply(_init_weights)  # before the adaptor is attached: it keeps its own (PyTorch default) init
        self.adaptor = adaptor
        self.knowledge_proj = nn.Linear(adaptor.output_dim, hidden_dim) if adaptor is not None else None

    def _check_seq(self, item_seq: torch.Tensor) -> torch.Tensor:
        if item_seq.dim() != 2 or item_seq.shape[1] > self.max_len:
            raise ValueError(
                f"item_seq must be [B, L] with L <= max_len={self.max_len}, got {tuple(item_seq.shape)}; "
                "keep each user's last max_len items"
            )
        valid = item_seq != 0  # [B, L]
        if (valid[:, :-1] & ~valid[:, 1:]).any():
            raise ValueError("item_seq must be LEFT-padded (zeros before the items); a 0 follows an item in some row")
        if not valid[:, -1].all():
            raise ValueError("some row of item_seq has no items; drop users without history before scoring")
        return valid

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        """item_seq [B, L] left-padded -> hidden [B, L, D], exactly zero at padding positions."""
        valid = self._check_seq(item_seq).unsqueeze(-1)  # [B, L, 1]
        L = item_seq.shape[1]
        # Positions count back from the most recent item, so extra left padding leaves every item's position as is.
        positions = torch.arange(L - 1, -1, -1, device=item_seq.device)  # [L]
        x = self.emb_dropout(self.item_emb(item_seq) + self.pos_emb(positions)) * valid  # [B, L, D]
        allowed = _attention_mask(valid.squeeze(-1), causal=True)  # [B, L, L]
        for block in self.blocks:
            x = block(x, allowed) * valid
        return self.final_ln(x) * valid

    def _fuse(self, hidden: torch.Tensor, knowledge: Knowledge | None) -> torch.Tensor:
        """hidden [B, D] or [B, L, D] -> same shape, with the augmented user vector added."""
        _check_knowledge(self.adaptor, knowledge)
        if self.adaptor is None:
            return hidden
        augmented = self.adaptor.concat(self.adaptor(knowledge))  # [B, K]
        if augmented.dim() != 2:
            raise ValueError("SASRec takes user-level knowledge, one [B, D_t] tensor per type")
        # Added after a projection rather than concatenated: the user vector stays in the item-embedding space the
        # tied scoring uses, and a zero projection recovers the ID-only model exactly.
        fused = self.knowledge_proj(augmented)  # [B, D]
        return hidden + (fused.unsqueeze(1) if hidden.dim() == 3 else fused)

    def user_repr(self, item_seq: torch.Tensor, knowledge: Knowledge | None = None) -> torch.Tensor:
        """item_seq [B, L] -> user representation [B, D] at the last (most recent) position."""
        return self._fuse(self.forward(item_seq)[:, -1], knowledge)

    def _item_logits(self, user: torch.Tensor) -> torch.Tensor:
        logits = user @ self.item_emb.weight.T  # [..., num_items + 1]
        return logits.index_fill(-1, torch.zeros(1, dtype=torch.long, device=logits.device), float("-inf"))

    def full_scores(self, item_seq: torch.Tensor, knowledge: Knowledge | None = None) -> torch.Tensor:
        """Scores of every item, [B, num_items + 1]; column 0 (padding) is -inf so it is never recommended."""
        return self._item_logits(self.user_repr(item_seq, knowledge))

    def score_candidates(
        self, item_seq: torch.Tensor, candidates: torch.Tensor, knowledge: Knowledge | None = None
    ) -> torch.Tensor:
        """candidates [B, C] item indices (0 = padding) -> scores [B, C], -inf at padding."""
        user = self.user_repr(item_seq, knowledge)  # [B, D]
        scores = (self.item_emb(candidates) * user.unsqueeze(1)).sum(-1)  # [B, C]
        return scores.masked_fill(candidates == 0, float("-inf"))

    def next_item_loss(
        self, item_seq: torch.Tensor, targets: torch.Tensor, knowledge: Knowledge | None = None
    ) -> torch.Tensor:
        """Full-softmax cross-entropy over all items (RecBole loss_type='CE').

        targets [B]: the next item after each sequence (loss at the last position only, RecBole style), or
        targets [B, L]: the next item after every position, 0 where no loss is wanted (original SASRec style; one
        forward pass trains L predictions). Returns a scalar mean over non-zero targets.
        With knowledge, prefer zero targets inside the LLM's history window: its text describes those very items,
        so predicting them from it teaches the model to copy rather than to generalise.
        """
        if targets.shape not in (item_seq.shape[:1], item_seq.shape):
            raise ValueError(
                f"targets must be [B] or [B, L] for item_seq {tuple(item_seq.shape)}, got {tuple(targets.shape)}"
            )
        if not (targets != 0).any():
            raise ValueError("all targets are 0 (ignored); give each batch at least one next item")
        if targets.dim() == 1:
            logits = self._item_logits(self.user_repr(item_seq, knowledge))  # [B, N + 1]
        else:
            if (targets[item_seq == 0] != 0).any():
                raise ValueError("targets [B, L] must be 0 where item_seq is padding: those outputs are zeroed")
            logits = self._item_logits(self._fuse(self.forward(item_seq), knowledge))  # [B, L, N + 1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)


def _masked_mean(emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """emb [..., A, D] of ids [..., A] (0 = padding) -> mean over non-padding [..., D]; zeros when all padding."""
    valid = (ids != 0).unsqueeze(-1).to(emb.dtype)  # [..., A, 1]
    return (emb * valid).sum(-2) / valid.sum(-2).clamp(min=1.0)


class ItemPrior(nn.Module):
    """What an item count knows, for every backbone: each candidate's popularity among train users as a standardised
    log count (a feature, and a logit term with a learned weight) and, with `bias`, a learned per-item bias.

    Without it the list-wise re-rankers had no item prior at all, and with a few hundred train users most item
    embeddings saw a handful of lists: every learned row ranked at or below a plain popularity count. The weight
    starts at 1, so an untrained model already ranks by popularity and training moves away from it only where the
    lists say so. `own` [B, C] marks candidates the list's owner is among the counted users of (a train user's own
    interactions): their count is taken without that user (leave-user-out), so a train list's positives do not carry
    their own label in the count, which no valid or test user's count can do.
    """

    def __init__(self, num_items: int, bias: bool = True):
        super().__init__()
        # [1], not 0-dim: DeepSpeed broadcasts each tensor as bytes, which a 0-dim tensor cannot be viewed as.
        self.register_buffer("count", torch.zeros(num_items + 1))
        self.register_buffer("center", torch.zeros(1))
        self.register_buffer("scale", torch.ones(1))
        self.weight = nn.Parameter(torch.ones(1))
        self.bias = nn.Embedding(num_items + 1, 1, padding_idx=0) if bias else None

    def reset_bias(self) -> None:
        if self.bias is not None:
            nn.init.zeros_(self.bias.weight)

    def set_counts(self, counts: torch.Tensor) -> None:
        """counts [num_items + 1]: train users per item idx (row 0 padding); the standardisation is over real items."""
        if counts.shape != self.count.shape:
            raise ValueError(f"item counts must be [{self.count.shape[0]}] (num_items + 1), got {tuple(counts.shape)}")
        self.count.copy_(counts.to(self.count.dtype))
        log_count = torch.log1p(self.count[1:])
        self.center.fill_(log_count.mean().item())
        self.scale.fill_(log_count.std().clamp(min=1e-6).item() if len(log_count) > 1 else 1.0)

    def feature(self, candidates: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
        """candidates [B, C], own [B, C] bool or None -> standardised log count [B, C] (0 at padding)."""
        count = self.count[candidates]  # [B, C]
        if own is not None:
            count = (count - own.to(count.dtype)).clamp(min=0)
        return ((torch.log1p(count) - self.center) / self.scale) * (candidates != 0)

    def logit(self, candidates: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The prior's term of each candidate's logit [B, C]: weight x feature (+ the item's bias)."""
        out = self.weight * feature
        return out + self.bias(candidates).squeeze(-1) if self.bias is not None else out


class ListReranker(nn.Module):
    """What every list-wise re-ranker shares: each candidate's input features, one score logit per candidate.

    Each candidate's input is [item embedding ; attribute bag (if num_attributes) ; user history summary
    (if use_history) ; augmented knowledge (if adaptor) ; user x item match features (if interaction) ; the item
    prior's log count (if item_prior)] -> linear to d_model, normalised; with item_prior the logit also gets the
    prior's term (ItemPrior). Subclasses say how a list of those vectors becomes scores (`_scores`): PRM and SetRank by
    self-attention over the list, with and without list positions, DLCM by a GRU over the list in its initial order.

    Knowledge types (the adaptor's): "user" is user level, [B, D] (one vector) or [B, S, D] (S segment vectors,
    all-zero rows = padding); every other type ("item") is per candidate, [B, C, D].
    KAR broadcasts one user vector to every candidate, where it is the same offset for the whole list and can only
    reorder through the non-linear layers. With `interaction`, each candidate (its item embedding and item knowledge)
    queries the user's segments, and the match of the pooled user vector with the candidate enters twice: as
    features (u_c and u_c * q_c) and as a bilinear term added to the logit, so a text that names what a user likes
    moves exactly the candidates it matches (a deviation from KAR, measured by `rlrf4rec controls`).
    """

    def __init__(
        self,
        num_items: int,
        *,
        item_dim: int = 32,
        num_attributes: int = 0,
        attribute_dim: int = 16,
        use_history: bool = False,
        adaptor: KnowledgeAdaptor | None = None,
        d_model: int = 64,
        max_list_len: int = 10,
        interaction: bool = False,
        item_prior: bool = False,
    ):
        super().__init__()
        if interaction and (adaptor is None or "user" not in adaptor.types):
            raise ValueError('interaction needs an adaptor with "user" knowledge; build it with interaction=False')
        self.max_list_len, self.use_history = max_list_len, use_history
        self.item_emb = nn.Embedding(num_items + 1, item_dim, padding_idx=0)
        self.attr_emb = nn.Embedding(num_attributes + 1, attribute_dim, padding_idx=0) if num_attributes else None
        in_dim = item_dim + (attribute_dim if num_attributes else 0) + (item_dim if use_history else 0)
        in_dim += adaptor.output_dim if adaptor is not None else 0
        self.prior = ItemPrior(num_items) if item_prior else None
        in_dim += 1 if item_prior else 0
        self.interaction = interaction
        self.raw_similarity = False
        if interaction:
            k = adaptor.out_dim
            item_knowledge_dim = adaptor.out_dim * (len(adaptor.types) - 1)
            self.match_query = nn.Linear(item_dim + item_knowledge_dim, k)  # candidate -> query in user space
            self.match_user = nn.Linear(k, k)  # user -> bilinear partner of the query
            in_dim += k  # u_c takes the user's place in the adaptor's output; the product u_c * q_c is extra
            # With item knowledge in the user's encoder space: the raw cosine of the candidate's text with the
            # user's closest and average segment, a match no learned 32-d projection has to rediscover.
            self.raw_similarity = (
                "item" in adaptor.types and adaptor.gate["item"].in_features == adaptor.gate["user"].in_features
            )
            if self.raw_similarity:
                self.similarity_head = nn.Linear(2, 1)
                in_dim += 2
        self.input_proj = nn.Linear(in_dim, d_model)
        # The N(0, 0.02) init leaves the projected features ~50x smaller than unit scale, and the knowledge part of
        # them smaller still; normalising restores unit scale, without which training sat at the base rate for
        # dozens of epochs before the knowledge signal took hold.
        self.input_ln = nn.LayerNorm(d_model)

    def _finish_init(self, adaptor: KnowledgeAdaptor | None) -> None:
        """Called by each subclass once its own layers exist, so every layer (the adaptor aside) gets the same init
        in the order the layers were made."""
        self.apply(_init_weights)
        if self.interaction:  # unit-scale bilinear term from the start: N(0, 0.02) would hide it for many epochs
            nn.init.xavier_uniform_(self.match_query.weight)
            nn.init.xavier_uniform_(self.match_user.weight)
            if self.raw_similarity:
                nn.init.constant_(self.similarity_head.weight, 1.0)
        if self.prior is not None:
            self.prior.reset_bias()
        self.adaptor = adaptor

    def _check_inputs(self, candidates, attributes, history) -> None:
        if candidates.dim() != 2 or candidates.shape[1] > self.max_list_len:
            raise ValueError(
                f"candidates must be [B, C] with C <= max_list_len={self.max_list_len}, "
                f"got {tuple(candidates.shape)}; raise max_list_len"
            )
        if (self.attr_emb is None) != (attributes is None):
            raise ValueError("pass attributes [B, C, A] iff the model was built with num_attributes > 0")
        if self.use_history != (history is not None):
            raise ValueError("pass history [B, H] iff the model was built with use_history=True")

    def _knowledge_features(
        self, knowledge: Knowledge, item_vectors: torch.Tensor, C: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> features [B, C, F] and the bilinear match logit [B, C] (None without interaction)."""
        raw = self.adaptor.as_mapping(knowledge)
        user = raw.get("user")
        if user is not None and user.dim() not in (2, 3):
            raise ValueError(f"user knowledge must be [B, D] or [B, S, D], got {tuple(user.shape)}")
        segments = None
        if user is not None and user.dim() == 3:
            if not isinstance(knowledge, Mapping):
                raise ValueError('segmented user knowledge [B, S, D] must be passed as {"user": ..., ...}')
            segments = real_segments(knowledge["user"])
        outputs = self.adaptor(knowledge)  # type -> [B, out] | [B, S, out] | [B, C, out]
        for t, v in outputs.items():
            if t != "user" and v.shape[:2] != item_vectors.shape[:2]:
                raise ValueError(f'"{t}" knowledge is per candidate: [B, C, D], got {tuple(raw[t].shape)}')
        items = [outputs[t] for t in self.adaptor.types if t != "user"]  # each [B, C, out]
        if user is None:
            return torch.cat(items, dim=-1), None
        u = outputs["user"]
        if not self.interaction:
            if segments is not None:  # no candidate to query with: the plain mean of the user's segments
                u = pool_segments(u, segments)
            return torch.cat([u.unsqueeze(1).expand(-1, C, -1), *items], dim=-1), None
        query = self.match_query(torch.cat([item_vectors, *items], dim=-1))  # [B, C, K]
        if segments is None:
            u_c = u.unsqueeze(1).expand(-1, C, -1)  # [B, C, K]
        else:
            att = torch.einsum("bck,bsk->bcs", query, u) / u.shape[-1] ** 0.5  # [B, C, S]
            att = att.masked_fill(~segments.unsqueeze(1), float("-inf")).softmax(-1)
            u_c = torch.einsum("bcs,bsk->bck", att, u)  # [B, C, K]
        partner = self.match_user(u_c)  # [B, C, K]
        match = (partner * query).sum(-1) / query.shape[-1] ** 0.5  # [B, C]
        features = [u_c, partner * query, *items]
        if self.raw_similarity:
            # The encoder's dtype (fp16 on some GPUs) for the cosine, the model's for what follows.
            similarity = raw_similarity(knowledge["user"], knowledge["item"], segments).to(u.dtype)  # [B, C, 2]
            features.append(similarity)
            match = match + self.similarity_head(similarity).squeeze(-1)
        return torch.cat(features, dim=-1), match

    def forward(
        self,
        candidates: torch.Tensor,
        attributes: torch.Tensor | None = None,
        knowledge: Knowledge | None = None,
        history: torch.Tensor | None = None,
        own: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """candidates [B, C] (0 = padding), attributes [B, C, A] (0 = padding), history [B, H] -> logits [B, C];
        own [B, C] bool: the candidates counted in the item prior for this very user (ItemPrior), None = none.

        Padding candidates get -inf: they rank last and the losses leave them out.
        """
        self._check_inputs(candidates, attributes, history)
        _check_knowledge(self.adaptor, knowledge)
        C = candidates.shape[1]
        item_vectors = self.item_emb(candidates)  # [B, C, item_dim]
        parts = [item_vectors]
        if attributes is not None:
            parts.append(_masked_mean(self.attr_emb(attributes), attributes))  # [B, C, attribute_dim]
        if history is not None:
            summary = _masked_mean(self.item_emb(history), history)  # [B, item_dim]
            parts.append(summary.unsqueeze(1).expand(-1, C, -1))
        match = None
        if knowledge is not None:
            features, match = self._knowledge_features(knowledge, item_vectors, C)
            parts.append(features)  # [B, C, F]
        prior = None
        if self.prior is not None:
            prior = self.prior.feature(candidates, own)  # [B, C]
            parts.append(prior.unsqueeze(-1).to(item_vectors.dtype))
        valid = candidates != 0  # [B, C]
        logits = self._scores(self.input_ln(self.input_proj(torch.cat(parts, dim=-1))), valid)  # [B, C]
        if match is not None:
            logits = logits + match
        if prior is not None:
            logits = logits + self.prior.logit(candidates, prior)
        return logits.masked_fill(~valid, float("-inf"))

    def _scores(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Candidate vectors x [B, C, d_model] of lists with real candidates `valid` [B, C] -> logits [B, C]."""
        raise NotImplementedError


def real_segments(user: torch.Tensor) -> torch.Tensor:
    """Segmented user knowledge [B, S, D] (all-zero rows = padding) -> its real segments [B, S] bool; a user without
    text keeps its (zero) first segment, so attention and means always have something to read."""
    segments = user.abs().sum(-1) > 0
    segments[:, 0] |= ~segments.any(-1)
    return segments


def pool_segments(u: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """[B, S, K] per-segment vectors -> [B, K], the mean over each user's real segments [B, S]."""
    w = segments.unsqueeze(-1).to(u.dtype)
    return (u * w).sum(1) / w.sum(1)


def raw_similarity(user: torch.Tensor, item: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """user [B, D] or [B, S, D], item [B, C, D] (encoder outputs, L2-normalised) -> [B, C, 2]: the cosine with the
    closest and the mean over the user's real segments."""
    if user.dim() == 2:
        user, segments = user.unsqueeze(1), torch.ones(user.shape[0], 1, dtype=torch.bool, device=user.device)
    cos = torch.einsum("bcd,bsd->bcs", item.to(user.dtype), user)  # [B, C, S]
    real = segments.unsqueeze(1)  # [B, 1, S]
    closest = cos.masked_fill(~real, float("-inf")).amax(-1)  # [B, C]
    mean = (cos * real).sum(-1) / real.sum(-1).clamp(min=1)  # [B, C]
    return torch.stack([closest, mean], dim=-1)


class _SelfAttentionReranker(ListReranker):
    """Stacked self-attention blocks over the candidates, with list positions (PRM) or without (SetRank)."""

    positions: bool

    def __init__(
        self, num_items: int, *, num_layers: int = 2, num_heads: int = 2, dropout: float = 0.1, **features
    ):  # fmt: skip
        super().__init__(num_items, **features)
        d_model = self.input_proj.out_features
        # Made in this order (position embedding first) so PRM's initial weights are those it always had.
        self.pos_emb = nn.Embedding(self.max_list_len, d_model) if self.positions else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, num_heads, dropout) for _ in range(num_layers))
        self.final_ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1)
        self._finish_init(features.get("adaptor"))

    def _scores(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        x = self.dropout(x) * valid.unsqueeze(-1)  # [B, C, d_model]
        allowed = _attention_mask(valid, causal=False)  # [B, C, C]
        for block in self.blocks:
            x = block(x, allowed) * valid.unsqueeze(-1)
        return self.head(self.final_ln(x)).squeeze(-1)  # [B, C]


class PRM(_SelfAttentionReranker):
    """Personalized Re-ranking Model (Pei et al., RecSys'19): self-attention over the list with its positions."""

    positions = True


class SetRank(_SelfAttentionReranker):
    """SetRank (Pang et al., SIGIR'20): stacked multi-head self-attention blocks over the candidates as a set.

    No position embedding, so a candidate's score does not depend on where the list put it (permutation
    equivariant; a test checks it). SetRank's attention-rank loss, cross-entropy between softmax(scores) and the
    labels normalised over each list, is `loss: listnet` for binary labels; BCE stays the default as for PRM.
    """

    positions = False


class DLCM(ListReranker):
    """Deep Listwise Context Model (Ai et al., SIGIR'18): a GRU reads the list in its initial order and each
    candidate is scored against the list's context.

    As in DLCM, the GRU reads from the bottom of the list to the top, so its final state s_n is nearest to the top
    candidates; each output o_i is scored by the local ranking function phi(o_i, s_n) = V (o_i * tanh(W s_n + b)).
    Padding (left of the list) is skipped with a packed sequence, so it never enters s_n.
    """

    def __init__(self, num_items: int, *, num_layers: int = 1, dropout: float = 0.1, **features):
        super().__init__(num_items, **features)
        d_model = self.input_proj.out_features
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(d_model, d_model, num_layers=num_layers, batch_first=True)
        self.context = nn.Linear(d_model, d_model)  # W, b
        self.head = nn.Linear(d_model, 1, bias=False)  # V
        self._finish_init(features.get("adaptor"))  # the GRU keeps PyTorch's init: _init_weights skips it
        # phi is a product of two N(0, 0.02)-small factors at init, a saddle where training sat at the base rate for
        # dozens of epochs on the synthetic lists; unit-scale factors start it learning at once.
        nn.init.xavier_uniform_(self.context.weight)
        nn.init.xavier_uniform_(self.head.weight)

    def _scores(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, C, D = x.shape
        x = self.dropout(x) * valid.unsqueeze(-1)
        lengths = valid.sum(-1)  # [B]
        # Candidates are left-padded: flipped, the list runs bottom-to-top with its padding at the end.
        packed = nn.utils.rnn.pack_padded_sequence(
            x.flip(1), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, last = self.gru(packed)  # last [layers, B, D]
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=C)  # [B, C, D] flipped
        context = torch.tanh(self.context(last[-1]))  # [B, D]
        return self.head(out.flip(1) * context.unsqueeze(1)).squeeze(-1)  # [B, C]


class SASRecRanker(nn.Module):
    """SASRec as a re-ranker and reward model: the user's history window is the sequence, its last hidden state
    (plus the augmented user knowledge) is the user vector, and each candidate's score is its dot product with the
    candidate vector (item embedding, attribute bag and item knowledge). Same inputs and outputs as the list
    re-rankers, so the same lists, losses, metrics and rewards apply: a text's reward is how well the user's later
    items, among the list's candidates, are ranked from the history plus the text.

    User knowledge is pooled over its real segments (SASRec has one user vector); with `interaction` and item
    knowledge in the user's encoder space, the raw cosine match of the list re-rankers is added to the logit too.
    """

    def __init__(
        self,
        num_items: int,
        num_attributes: int = 0,
        use_history: bool = True,
        adaptor: KnowledgeAdaptor | None = None,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        history_len: int = 30,
        max_list_len: int = 10,
        dropout: float = 0.1,
        interaction: bool = False,
        item_prior: bool = False,
    ):
        super().__init__()
        if not use_history:
            raise ValueError(
                "backbone sasrec reads the user's history window as its sequence; set recommender.use_history: true"
            )
        self.max_list_len, self.use_history = max_list_len, use_history
        self.encoder = SASRec(num_items, d_model, num_layers, num_heads, max(history_len, 1), dropout)
        self.attr_emb = nn.Embedding(num_attributes + 1, d_model, padding_idx=0) if num_attributes else None
        self.bias = nn.Embedding(num_items + 1, 1, padding_idx=0)  # per-item prior (popularity)
        self.apply(_init_weights)
        self.prior = ItemPrior(num_items, bias=False) if item_prior else None  # the count; `bias` is the item bias
        self.adaptor = adaptor
        self.user_proj = self.item_proj = self.similarity_head = None
        if adaptor is not None:
            if "user" in adaptor.types:
                self.user_proj = nn.Linear(adaptor.out_dim, d_model)
            if len(adaptor.types) > ("user" in adaptor.types):
                self.item_proj = nn.Linear(adaptor.out_dim * (len(adaptor.types) - ("user" in adaptor.types)), d_model)
            if interaction and "item" in adaptor.types and "user" in adaptor.types:
                self.similarity_head = nn.Linear(2, 1)
                nn.init.constant_(self.similarity_head.weight, 1.0)

    def forward(
        self,
        candidates: torch.Tensor,
        attributes: torch.Tensor | None = None,
        knowledge: Knowledge | None = None,
        history: torch.Tensor | None = None,
        own: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same contract as ListReranker.forward; history [B, H] is required (left-padded, >= 1 item a row)."""
        if history is None:
            raise ValueError("SASRecRanker needs history [B, H]: the sequence its user vector is read from")
        if candidates.dim() != 2 or candidates.shape[1] > self.max_list_len:
            raise ValueError(f"candidates must be [B, C] with C <= {self.max_list_len}, got {tuple(candidates.shape)}")
        if (self.attr_emb is None) != (attributes is None):
            raise ValueError("pass attributes [B, C, A] iff the model was built with num_attributes > 0")
        _check_knowledge(self.adaptor, knowledge)
        user = self.encoder(history)[:, -1]  # [B, D]
        items = self.encoder.item_emb(candidates)  # [B, C, D]
        if attributes is not None:
            items = items + _masked_mean(self.attr_emb(attributes), attributes)
        extra = 0.0
        if knowledge is not None:
            outputs = self.adaptor(knowledge)
            segments = None
            if "user" in outputs:
                u = outputs["user"]  # [B, D_k] or [B, S, D_k]
                if u.dim() == 3:
                    segments = real_segments(knowledge["user"])
                    u = pool_segments(u, segments)
                user = user + self.user_proj(u)
            per_item = [outputs[t] for t in self.adaptor.types if t != "user"]
            if per_item:
                items = items + self.item_proj(torch.cat(per_item, dim=-1))
            if self.similarity_head is not None:
                sim = raw_similarity(knowledge["user"], knowledge["item"], segments).to(user.dtype)  # [B, C, 2]
                extra = self.similarity_head(sim).squeeze(-1)
        logits = (items * user.unsqueeze(1)).sum(-1) + self.bias(candidates).squeeze(-1) + extra  # [B, C]
        if self.prior is not None:
            logits = logits + self.prior.logit(candidates, self.prior.feature(candidates, own))
        return logits.masked_fill(candidates == 0, float("-inf"))


def listwise_bce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per candidate, averaged over real candidates. logits, labels, mask: [B, C]."""
    if not mask.any():
        raise ValueError("mask selects no candidate; every batch needs at least one real (non-padding) candidate")
    # Boolean selection keeps the -inf padding logits out of the loss entirely (they would give inf - inf = NaN).
    return F.binary_cross_entropy_with_logits(logits[mask], labels[mask].to(logits.dtype))


def listnet_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ListNet (top-one): cross-entropy between softmax(labels) restricted to positives and softmax(logits) over the
    real candidates of each list; lists without a positive carry no ordering and are left out. [B, C] inputs."""
    if not mask.any():
        raise ValueError("mask selects no candidate; every batch needs at least one real (non-padding) candidate")
    labels = labels.to(logits.dtype) * mask
    has_positive = labels.sum(-1) > 0  # [B]
    if not has_positive.any():
        return logits[mask].sum() * 0.0  # keeps the graph (DDP expects every parameter's gradient)
    log_p = logits.masked_fill(~mask, float("-inf")).log_softmax(-1)  # [B, C]
    target = labels / labels.sum(-1, keepdim=True).clamp(min=1.0)  # [B, C]
    per_list = -(target * log_p.masked_fill(~mask, 0.0)).sum(-1)  # [B]
    return per_list[has_positive].mean()


LOSSES = {"bce": listwise_bce_loss, "listnet": listnet_loss}

"""Knowledge controls: does the re-ranker's order follow the knowledge it is given? (METHOD.md section 4)

Consumes the data stage's tables and the frozen encoder; produces `<run>/controls/` with one row per variant:
baselines (item popularity, KAR ID-only, ID + history), knowledge variants, a positive control whose user text leaks
the answer on purpose ("Liked: " + the titles of the positives in the user's own lists), and negative controls (the
same models fed another user's knowledge or the mean knowledge, and a model trained on texts permuted across users).
Every trained variant runs over several seeds; per-user valid NDCG@5 (test is never read) gives paired bootstrap
intervals of each variant's difference to the baselines. Training is in process (no Ray): the lists are small.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import read_marker, read_parquet, read_tables, require_marker, stage_output, write_json
from rlrf4rec.core.audit import derangement, spearman
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.layout import GENERATIONS, ITEM_KNOWLEDGE, PER_USER_JSON, RELIABILITY, TABLE_JSON, TABLE_MD
from rlrf4rec.core.prompts import user_knowledge_text
from rlrf4rec.core.recommender import (
    KnowledgeInput,
    RerankTask,
    fit,
    knowledge_dims,
    standardize_adaptor,
)
from rlrf4rec.stages.encode import generate_policy_texts, policy_knowledge_texts, policy_texts_dir

log = logging.getLogger(__name__)

METRIC = "ndcg@5"


@dataclass(frozen=True)
class Variant:
    """One row of the controls table. `user`/`item`: knowledge text kinds (None: absent); `perturb`: how the
    trained model's valid knowledge is replaced at evaluation ("shuffled" users, "mean" vector); `trained_as`: the
    variant whose models a perturbed row re-uses."""

    name: str
    use_history: bool = False
    # "history" | "llm" (the base policy's, llm_texts_dir) | "teacher" (core/profile.py, of the prompt's window) |
    # "teacher_window" (of the whole history window) | "leak" | "leak_permuted"
    user: str | None = None
    item: str | None = None  # "metadata"
    perturb: str | None = None
    trained_as: str | None = None


VARIANTS = (
    Variant("popularity"),
    Variant("KAR ID-only"),
    Variant("ID + history", use_history=True),
    Variant("item metadata", item="metadata"),
    Variant("history text", user="history"),
    Variant("history text + ID history", use_history=True, user="history"),
    Variant("history text + item metadata", user="history", item="metadata"),
    Variant("base LLM text", user="llm"),
    Variant("base LLM text + item metadata", user="llm", item="metadata"),
    Variant(
        "base LLM text + item metadata, shuffled users",
        user="llm",
        item="metadata",
        perturb="shuffled",
        trained_as="base LLM text + item metadata",
    ),
    Variant("teacher profile + item metadata", user="teacher", item="metadata"),
    Variant("teacher profile (whole window) + item metadata", user="teacher_window", item="metadata"),
    Variant(
        "teacher profile + item metadata, shuffled users",
        user="teacher",
        item="metadata",
        perturb="shuffled",
        trained_as="teacher profile + item metadata",
    ),
    Variant("leak (positive control)", user="leak"),
    Variant("leak + item metadata (positive control)", user="leak", item="metadata"),
    Variant(
        "leak + item metadata, shuffled users",
        user="leak",
        item="metadata",
        perturb="shuffled",
        trained_as="leak + item metadata (positive control)",
    ),
    Variant(
        "leak + item metadata, mean user vector",
        user="leak",
        item="metadata",
        perturb="mean",
        trained_as="leak + item metadata (positive control)",
    ),
    Variant("leak permuted across users (trained)", user="leak_permuted", item="metadata"),
)


def leaked_texts(tables: dict[str, pa.Table]) -> dict[str, str]:
    """user_id -> "Liked: " + the titles of the positives in that user's own re-rank lists (the answer, on purpose)."""
    title = dict(zip(tables["items"].column(S.ITEM_ID).to_pylist(), tables["items"].column(S.TITLE).to_pylist()))
    liked: dict[str, dict[str, None]] = {}
    for r in tables["rerank_lists"].select([S.USER_ID, S.CANDIDATE_ITEMS, S.LABELS]).to_pylist():
        bucket = liked.setdefault(r[S.USER_ID], {})
        bucket.update({title[i]: None for i, y in zip(r[S.CANDIDATE_ITEMS], r[S.LABELS]) if y})
    return {u: "Liked: " + "; ".join(titles) for u, titles in liked.items()}


def per_user(task: RerankTask, per_list: np.ndarray, split: str = "valid") -> tuple[list[str], np.ndarray]:
    """Per-list values of `split` -> (users, [U, 2] per-user sum and count of lists): the unit of resampling."""
    users = sorted(set(task.list_users[split]))
    row = {u: i for i, u in enumerate(users)}
    owner = np.array([row[u] for u in task.list_users[split]])
    sums = np.bincount(owner, weights=per_list, minlength=len(users))
    return users, np.stack([sums, np.bincount(owner, minlength=len(users)).astype(float)], axis=1)


def list_mean(per_user_sums: np.ndarray) -> float:
    """[U, 2] (sum, count) -> the mean over lists (what the recommender stage reports as valid/ndcg@5)."""
    return float(per_user_sums[:, 0].sum() / per_user_sums[:, 1].sum())


def paired_bootstrap(a: np.ndarray, b: np.ndarray, num_samples: int, seed: int) -> list[float]:
    """Difference of list means a - b [U, 2] with a 95% percentile interval from resampling users (the lists of
    a user are not independent, so the user is the unit; both sides see the same resampled users)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(num_samples, len(a)))  # [R, U]
    diffs = a[idx, 0].sum(1) / a[idx, 1].sum(1) - b[idx, 0].sum(1) / b[idx, 1].sum(1)
    low, high = np.quantile(diffs, [0.025, 0.975])
    return [list_mean(a) - list_mean(b), float(low), float(high)]


def perturb_user_knowledge(knowledge: dict[str, torch.Tensor], task: RerankTask, how: str, seed: int):
    """The valid users' user knowledge replaced: "shuffled" (another valid user's, a derangement) or "mean" (the
    train users' mean vector, or one segment holding the mean of their real segments: no user-specific signal is
    left). Other users and item knowledge are unchanged."""
    user = knowledge["user"].clone()
    rows = task.splits["valid"].user_row.unique()
    if how == "shuffled":
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        source = torch.empty_like(perm)
        source[perm] = perm.roll(1)  # one random cycle through all valid users: nobody keeps their own
        user[rows] = knowledge["user"][rows[source]]
    elif how == "mean":
        train = knowledge["user"][task.splits["train"].user_row.unique()]  # [T, D] or [T, S, D]
        if train.dim() == 3:  # one segment: the mean of the real ones, the rest padding
            real = train.reshape(-1, train.shape[-1])
            user[rows] = 0.0
            user[rows, 0] = real[real.abs().sum(-1) > 0].mean(0)
        else:
            user[rows] = train.mean(0)
    else:
        raise ValueError(f"perturbation {how!r} is not known; use shuffled or mean")
    return {**knowledge, "user": user}


def train_model(task: RerankTask, knowledge: KnowledgeInput, seed: int):
    """One in-process fit with early stopping on valid; returns the model holding its best weights and its state."""
    torch.manual_seed(seed)
    model = task.build_model(knowledge_dims(knowledge))
    if knowledge is not None:
        standardize_adaptor(model, knowledge, task)
    state = fit(task, model, knowledge, seed=seed)
    model.load_state_dict(state.best_model)
    return model, state


@dataclass
class KnowledgeSources:
    """Encoded knowledge for the controls: user text kind -> [U, D] or [U, S, D] (task user order), item kind ->
    [num_items + 1, D] (row 0 zero)."""

    user: dict[str, torch.Tensor]
    item: dict[str, torch.Tensor]

    def for_variant(self, v: Variant) -> KnowledgeInput:
        out = {}
        if v.user is not None:
            out["user"] = self.user[v.user]
        if v.item is not None:
            out["item"] = self.item[v.item]
        return out or None


def encode_sources(cfg: RunConfig, task: RerankTask, tables: dict[str, pa.Table], needed: set[str]):
    """Encode the texts the variants need with the run's frozen encoder (cached by text hash)."""
    from rlrf4rec.stages.data import user_history_texts
    from rlrf4rec.stages.encode import embedding_cache, encode_user_texts, make_encoder

    encoder = make_encoder(cfg)
    cache = embedding_cache(cfg)
    texts: dict[str, dict[str, str]] = {}
    if "history" in needed:
        texts["history"] = user_history_texts(cfg)
    if "llm" in needed:
        texts["llm"] = base_llm_knowledge_texts(cfg)
    for kind, max_items in (("teacher", cfg.generate.prompt_history), ("teacher_window", None)):
        if kind in needed:
            texts[kind] = teacher_knowledge_texts(cfg, max_items)
    if needed & {"leak", "leak_permuted"}:
        texts["leak"] = leaked_texts(tables)
    if "leak_permuted" in needed:  # every user gets another user's leak, the same one in training and evaluation
        users = sorted(texts["leak"])
        source = derangement(len(users), cfg.seed)  # nobody keeps their own
        texts["leak_permuted"] = {u: texts["leak"][users[j]] for u, j in zip(users, source)}
    user = {}
    for kind, by_user in texts.items():
        rows = [by_user.get(u, "") for u in task.users]
        user[kind] = torch.from_numpy(encode_user_texts(encoder, rows, cfg.knowledge.user_segments, cache))
    item = {}
    if "metadata" in needed:
        item["metadata"] = metadata_item_knowledge(cfg, task)
    return KnowledgeSources(user, item)


def teacher_knowledge_texts(cfg: RunConfig, max_items: int | None) -> dict[str, str]:
    """user -> the teacher profile of the last `max_items` window entries (+ history text, knowledge.history_text)."""
    from rlrf4rec.stages.data import teacher_texts, user_history_texts

    histories = user_history_texts(cfg)
    profiles = teacher_texts(cfg, max_items)
    return {u: user_knowledge_text(histories[u], p, cfg.knowledge.history_text) for u, p in profiles.items()}


def metadata_item_knowledge(cfg: RunConfig, task: RerankTask) -> torch.Tensor:
    """[num_items + 1, D] metadata item knowledge, written as the encode stage writes it (to its own directory when
    the run's knowledge.item is another kind, whose artifact the pipeline's re-rankers read)."""
    from rlrf4rec.stages.encode import write_item_knowledge
    from rlrf4rec.stages.train import item_knowledge_matrix

    meta_cfg = dataclasses.replace(cfg, knowledge=dataclasses.replace(cfg.knowledge, item="metadata"))
    stage = "items" if cfg.knowledge.item == "metadata" else "items-metadata"
    return item_knowledge_matrix(write_item_knowledge(meta_cfg, stage=stage) / ITEM_KNOWLEDGE, task)


def llm_texts_dir(cfg: RunConfig) -> Path:
    """The base policy's texts for the "llm" rows: the encode stage's (knowledge.user = llm), or `--llm-texts`."""
    return policy_texts_dir(cfg, "base")


def base_llm_knowledge_texts(cfg: RunConfig) -> dict[str, str]:
    """user -> the base policy's text + history text, from llm_texts_dir (which must be complete)."""
    llm_dir = llm_texts_dir(cfg)
    require_marker(llm_dir, "encode (knowledge.user: llm) or `rlrf4rec controls --llm-texts`")
    return policy_knowledge_texts(cfg, llm_dir)


def write_llm_texts(cfg: RunConfig) -> Path:
    """The base policy's text per train and valid user, as the encode stage writes it (resumable)."""
    from rlrf4rec.stages.sft import start_policy

    return generate_policy_texts(cfg, start_policy(cfg), "base")


def run_controls(cfg: RunConfig, *, seeds: int = 3, only: list[str] | None = None, name: str = "main") -> Path:
    """Train every variant (or those named in `only`) `seeds` times and write `<run>/controls/<name>/`
    (table.json, table.md, per_user.json)."""
    from rlrf4rec.stages.data import require_data

    data_dir = cfg.layout.data
    marker = require_data(cfg, "controls")
    has_llm = read_marker(llm_texts_dir(cfg)) is not None
    if not has_llm:
        log.info("controls: no %s (run `rlrf4rec controls --llm-texts`): base LLM rows left out", llm_texts_dir(cfg))
    variants = [
        v for v in VARIANTS if (only is None or v.name in only or v.trained_as in only) and (has_llm or v.user != "llm")
    ]
    if cfg.recommender.backbone == "sasrec":  # its user vector is read from the history: no history-free rows
        left_out = [v.name for v in variants if not v.use_history and v.name != "popularity"]
        if left_out:
            log.info("controls: backbone sasrec reads the ID history; left out %s", left_out)
        variants = [v for v in variants if v.use_history or v.name == "popularity"]
    needed = {v.trained_as for v in variants} - {v.name for v in variants} - {None}
    variants = [v for v in VARIANTS if v in variants or v.name in needed]  # a perturbed row needs its models
    tables = read_tables(data_dir)
    from rlrf4rec.stages.train import model_spec

    base_spec = model_spec(cfg.recommender)
    task = RerankTask(tables, base_spec)
    started = time.perf_counter()
    sources = encode_sources(cfg, task, tables, {x for v in variants for x in (v.user, v.item) if x})
    encode_seconds = time.perf_counter() - started
    seed_list = [cfg.seed + i for i in range(seeds)]
    values: dict[str, list[np.ndarray]] = {}  # variant -> per seed, per-user valid NDCG@5
    all_metrics: dict[str, dict[str, list[float]]] = {}  # variant -> metric -> per seed list mean (NDCG/MAP@k)
    info: dict[str, dict] = {}
    models: dict[tuple[str, int], torch.nn.Module] = {}
    users = None
    for v in variants:
        if v.name == "popularity":
            per_list = _metrics(task, task.popularity_scores("valid"))
            users, u = per_user(task, per_list[METRIC])
            values[v.name], info[v.name] = [u], {"seeds": 0, "seconds": 0.0}
            all_metrics[v.name] = {m: [float(x.mean())] for m, x in per_list.items()}
            continue
        task.spec = dataclasses.replace(base_spec, use_history=v.use_history)
        knowledge = sources.for_variant(v)
        values[v.name], epochs, seconds = [], [], []
        all_metrics[v.name] = {}
        for seed in seed_list:
            t0 = time.perf_counter()
            if v.trained_as is None:
                model, state = train_model(task, knowledge, seed)
                models[(v.name, seed)] = model
                epochs.append(state.best_epoch)
            else:
                model = models[(v.trained_as, seed)]
            k = knowledge if v.perturb is None else perturb_user_knowledge(knowledge, task, v.perturb, seed)
            per_list = task.per_list_metrics(model, "valid", k)
            users, u = per_user(task, per_list[METRIC])
            values[v.name].append(u)
            for m, x in per_list.items():
                all_metrics[v.name].setdefault(m, []).append(float(x.mean()))
            seconds.append(time.perf_counter() - t0)
            log.info("controls: %-45s seed %d valid %s %.4f", v.name, seed, METRIC, list_mean(u))
        info[v.name] = {"seeds": len(seed_list), "best_epochs": epochs, "seconds": float(np.sum(seconds))}
    rows = summarize(values, info, cfg.loop.bootstrap_samples, cfg.seed)
    for row in rows:
        row["backbone"] = cfg.recommender.backbone
        row["metrics"] = {m: float(np.mean(x)) for m, x in all_metrics[row["variant"]].items()}
    fingerprint = f"{cfg.section_hash('models', 'encode', 'knowledge', 'recommender', 'seed')}-{marker['fingerprint']}"
    stage_dir = cfg.layout.controls(name)
    with stage_output(stage_dir, fingerprint + f"-{seeds}", dump_config(cfg)) as (tmp, stats):
        write_json(rows, tmp / TABLE_JSON)
        write_json({"users": users, **{k: [x.tolist() for x in vs] for k, vs in values.items()}}, tmp / PER_USER_JSON)
        (tmp / TABLE_MD).write_text(settings_line(cfg, seed_list) + "\n\n" + markdown_table(rows))
        stats.update(
            {
                "variants": len(rows),
                "seeds": seed_list,
                "valid_users": len(users),
                "encode_seconds": round(encode_seconds, 1),
            }
        )
    print(settings_line(cfg, seed_list) + "\n\n" + markdown_table(rows))
    return stage_dir


def _metrics(task: RerankTask, scores: np.ndarray, split: str = "valid") -> dict[str, np.ndarray]:
    from rlrf4rec.core.metrics import rank_metrics
    from rlrf4rec.core.recommender import RERANK_KS

    data = task.splits[split]
    return rank_metrics(scores, data.labels.numpy(), ks=RERANK_KS, mask=(data.candidates != 0).numpy())


BASELINES = ("popularity", "KAR ID-only", "ID + history")


def summarize(values: dict[str, list[np.ndarray]], info: dict[str, dict], num_samples: int, seed: int) -> list[dict]:
    """Per variant: the list mean over seeds (and their spread) and the paired, user-resampled bootstrap CI of its
    difference to each baseline, per-user values averaged over seeds first."""
    rows = []
    for name, per_seed in values.items():
        means = [list_mean(u) for u in per_seed]
        row = {
            "variant": name,
            METRIC: float(np.mean(means)),
            "seed_means": means,
            "seed_spread": float(np.std(means)) if len(means) > 1 else 0.0,
            **info[name],
        }
        for base in BASELINES:
            if base in values and base != name:
                pair = paired_bootstrap(np.mean(per_seed, axis=0), np.mean(values[base], axis=0), num_samples, seed)
                row[f"vs {base}"] = pair
        rows.append(row)
    return rows


def settings_line(cfg: RunConfig, seeds: list[int]) -> str:
    rc, k = cfg.recommender, cfg.knowledge
    return (
        f"Settings: recommender.backbone={rc.backbone}; seeds {seeds}; knowledge.user_segments={k.user_segments}; "
        f"recommender.interaction="
        f"{rc.interaction}, loss={rc.loss}, hidden_dim={rc.hidden_dim}, lr={rc.lr}, patience={rc.patience}. "
        "Valid users only (test unread); each trained row's epoch is selected on these same valid lists, "
        "so trained rows carry a small optimistic bias that popularity does not."
    )


def markdown_table(rows: list[dict]) -> str:
    def ci(x):
        return "" if x is None else f"{x[0]:+.4f} [{x[1]:+.4f}, {x[2]:+.4f}]"

    head = (
        f"| variant | valid {METRIC} (mean of seeds) | seed spread (sd) | "
        + " | ".join(f"paired diff vs {b} [95% CI]" for b in BASELINES)
        + " |"
    )
    lines = [head, "|" + "---|" * (3 + len(BASELINES))]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r[METRIC]:.4f} | {r['seed_spread']:.4f} | "
            + " | ".join(ci(r.get(f"vs {b}")) for b in BASELINES)
            + " |"
        )
    return "\n".join(lines) + "\n"


BACKBONE_METRICS = tuple(f"{m}@{k}" for m in ("ndcg", "map") for k in (1, 3, 5, 7))


def backbone_table(tables: list[list[dict]]) -> str:
    """Controls tables of several runs of `rlrf4rec controls` (rows carrying "backbone" and "metrics"), side by side:
    one line per backbone and variant, every NDCG/MAP@k (mean of seeds), the NDCG@5 seed spread and its paired
    difference to ID + history."""

    def ci(x):
        return "" if x is None else f"{x[0]:+.4f} [{x[1]:+.4f}, {x[2]:+.4f}]"

    head = "| backbone | variant | " + " | ".join(BACKBONE_METRICS) + f" | {METRIC} sd | {METRIC} vs ID + history |"
    lines = [head, "|" + "---|" * (len(BACKBONE_METRICS) + 4)]
    for rows in tables:
        for r in rows:
            if "metrics" not in r:  # written before every metric was kept
                continue
            values = " | ".join(f"{r['metrics'][m]:.4f}" for m in BACKBONE_METRICS)
            lines.append(
                f"| {r.get('backbone', 'prm')} | {r['variant']} | {values} | {r['seed_spread']:.4f} | "
                f"{ci(r.get('vs ID + history'))} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- reward reliability


def _order_stats(rewards: list[np.ndarray], by_user: dict[str, list[int]], first: np.ndarray) -> dict:
    """Ties, seed agreement and how often the text the model was trained with (sample 0) wins, over users."""
    tied = [np.ptp(rewards[0][rows]) < 1e-12 for rows in by_user.values()]
    tops = [rewards[0][rows] for rows in by_user.values()]
    wins = [float(np.mean(first[rows][r == r.max()])) for rows, r in zip(by_user.values(), tops) if np.ptp(r)]
    rhos = [spearman(rewards[0][rows], rewards[1][rows]) for rows in by_user.values()] if len(rewards) > 1 else []
    defined = [r for r in rhos if r is not None]
    ci = None
    if len(defined) > 1:  # users resampled: the mean's 95% percentile interval
        idx = np.random.default_rng(0).integers(0, len(defined), size=(1000, len(defined)))
        ci = [float(x) for x in np.quantile(np.asarray(defined)[idx].mean(1), [0.025, 0.975])]
    return {
        "tied_share": float(np.mean(tied)),
        "spearman_mean": float(np.mean(defined)) if defined else None,
        "spearman_ci": ci,
        "spearman_per_user": [None if r is None else round(r, 4) for r in rhos],
        "spearman_defined_users": len(defined),
        "within_user_range_mean": float(np.mean([np.ptp(rewards[0][rows]) for rows in by_user.values()])),
        # Sample 0 is each user's knowledge text in training (knowledge.user = llm): a fitted user's lists make it
        # win more often than 1/N. Texts tied at the top share the win.
        "first_sample_best_share": float(np.mean(wins)) if wins else None,
    }


def base_knowledge(cfg: RunConfig, task: RerankTask, encoder, cache: Path | None) -> dict[str, torch.Tensor]:
    """The knowledge the run's base recommender (the round-0 reward model) trains with, in `task`'s user order:
    the base policy's text (+ history text, knowledge.history_text) with knowledge.user = llm, else the history
    text; and the run's item knowledge unless knowledge.item is none."""
    from rlrf4rec.stages.data import user_history_texts
    from rlrf4rec.stages.encode import encode_user_texts, write_item_knowledge
    from rlrf4rec.stages.train import item_knowledge_matrix

    trained_on = base_llm_knowledge_texts(cfg) if cfg.knowledge.user == "llm" else user_history_texts(cfg)
    user_texts = [trained_on[u] for u in task.users]
    knowledge = {"user": torch.from_numpy(encode_user_texts(encoder, user_texts, cfg.knowledge.user_segments, cache))}
    if cfg.knowledge.item != "none":
        knowledge["item"] = item_knowledge_matrix(write_item_knowledge(cfg) / ITEM_KNOWLEDGE, task)
    return knowledge


def reward_reliability(cfg: RunConfig, generations_dir: Path, seeds: int = 2, folds: int = 2) -> dict:
    """How trustworthy the reward is on the texts it will rank: reward models trained like the base one (the
    pipeline's base user and item knowledge, the run's architecture), `seeds` of them, score every generated text
    of train users.

    Two ways, side by side: in-sample (models trained on every train user, as the base recommender is), and
    cross-fitted (users split into `folds`; each user's texts scored by a model trained without that user's lists).
    Each reports the share of users whose N rewards all tie (no pair can be formed), the mean Spearman agreement
    between two seeds on the order of each user's texts (the order is what the pairs use), and how often sample 0
    (the text the in-sample model was trained with) is the best."""
    from rlrf4rec.core.protocol import stable_seed
    from rlrf4rec.stages.data import require_data, user_history_texts
    from rlrf4rec.stages.encode import (
        embedding_cache,
        encode_user_texts,
        make_encoder,
    )
    from rlrf4rec.stages.reward import RewardModel, check_fold
    from rlrf4rec.stages.train import model_spec

    require_data(cfg, "controls --reliability")
    data_dir = cfg.layout.data
    gens = read_parquet(generations_dir / GENERATIONS, S.GENERATIONS)
    spec = model_spec(cfg.recommender)
    histories = user_history_texts(cfg)
    encoder = make_encoder(cfg)
    cache = embedding_cache(cfg)
    task = RerankTask(read_tables(data_dir), spec)
    users_gen = gens.column(S.USER_ID).to_pylist()
    train_users = set(task.list_users["train"])
    keep = [i for i, u in enumerate(users_gen) if u in train_users]
    users = [users_gen[i] for i in keep]
    texts = [
        user_knowledge_text(histories[u], gens.column(S.PREFERENCE_TEXT)[i].as_py(), cfg.knowledge.history_text)
        for i, u in zip(keep, users)
    ]
    first = np.array([gens.column(S.SAMPLE_IDX)[i].as_py() == 0 for i in keep])
    knowledge = base_knowledge(cfg, task, encoder, cache)
    vectors = encode_user_texts(encoder, texts, cfg.knowledge.user_segments, cache)
    by_user: dict[str, list[int]] = {}
    for row, u in enumerate(users):
        by_user.setdefault(u, []).append(row)
    fold_of = {u: stable_seed(cfg.seed, "reliability-fold", u) % folds for u in by_user}
    for f in range(folds):  # the scored users are train users
        check_fold(folds, f, sum(k == f for k in fold_of.values()), len(train_users), "use 2 or more folds")

    metrics = [cfg.reward.metric, *(["pairwise"] if cfg.reward.metric != "pairwise" else [])]

    def score(model: torch.nn.Module, rows: list[int]) -> dict[str, np.ndarray]:
        """metric -> rewards of `rows`: the same model's scores read as each reward definition."""
        out = {}
        for metric in metrics:
            rm = RewardModel(
                task, model, metric, item_knowledge=knowledge.get("item"), user_segments=cfg.knowledge.user_segments
            )
            out[metric] = rm.score([users[r] for r in rows], vectors[rows])
        return out

    in_sample: dict[str, list[np.ndarray]] = {m: [] for m in metrics}  # metric -> per seed, rewards of every text
    cross_fit: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for i in range(seeds):
        seed = cfg.seed + i
        for m, r in score(train_model(task, knowledge, seed)[0], list(range(len(users)))).items():
            in_sample[m].append(r)
        out = {m: np.zeros(len(users)) for m in metrics}
        for f in range(folds):
            held = {u for u, k in fold_of.items() if k == f}
            rows = [r for r, u in enumerate(users) if u in held]
            for m, r in score(train_model(task.without_train_users(held), knowledge, seed)[0], rows).items():
                out[m][rows] = r
        for m in metrics:
            cross_fit[m].append(out[m])

    def ways(m: str) -> dict:
        result = {"in_sample": _order_stats(in_sample[m], by_user, first)}
        result["cross_fit"] = {**_order_stats(cross_fit[m], by_user, first), "folds": folds}
        # Ensembles of k = 2 .. seeds // 2 models (seeds 0..k-1 against k..2k-1): does averaging seeds make the
        # order reproducible, and as much as Spearman-Brown predicts from one pair of seeds (independent noise)?
        for way, per_seed in (("in_sample", in_sample[m]), ("cross_fit", cross_fit[m])):
            single = result[way]["spearman_mean"]
            for k in range(2, seeds // 2 + 1):
                pair = [np.mean(per_seed[:k], axis=0), np.mean(per_seed[k : 2 * k], axis=0)]
                # defined for r > -1/(k-1) (at most -1 apart, k noisy copies cannot agree less than that)
                defined = single is not None and 1 + (k - 1) * single > 0
                predicted = k * single / (1 + (k - 1) * single) if defined else None
                result[f"{way}_ensemble{k}"] = {**_order_stats(pair, by_user, first), "spearman_brown": predicted}
        return result

    by_metric = {m: ways(m) for m in metrics}
    return {
        "train_users": len(by_user),
        "texts": len(users),
        **by_metric[cfg.reward.metric],
        "metrics": by_metric,
        "settings": {
            "trained_on": cfg.knowledge.user,
            "interaction": spec.interaction,
            "item": cfg.knowledge.item,
            "user_segments": cfg.knowledge.user_segments,
            "loss": spec.loss,
        },
    }


def run_reward_reliability(cfg: RunConfig, generations_dir: Path, *, seeds: int = 2, name: str = "main") -> Path:
    """`reward_reliability` written to `<run>/controls/reliability-<name>/` (stats in the marker)."""
    gen_marker = require_marker(generations_dir, "generate")
    result = reward_reliability(cfg, generations_dir, seeds, folds=cfg.reward.cross_fit_folds or 2)
    fingerprint = f"{cfg.section_hash('knowledge', 'recommender', 'reward', 'seed')}-{gen_marker['fingerprint']}"
    stage_dir = cfg.layout.controls(f"reliability-{name}")
    with stage_output(stage_dir, fingerprint, dump_config(cfg)) as (tmp, stats):
        write_json(result, tmp / RELIABILITY)
        stats.update({k: v for k, v in result.items() if not isinstance(v, dict)})
        for metric, by_way in result["metrics"].items():
            for way, values in by_way.items():
                prefix = way if metric == cfg.reward.metric else f"{metric}/{way}"
                stats.update({f"{prefix}/{k}": v for k, v in values.items() if k != "spearman_per_user"})
    return stage_dir

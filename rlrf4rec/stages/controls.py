"""Knowledge controls: does the re-ranker's order follow the knowledge it is given? (METHOD.md section 4)

Consumes the data stage's tables and the frozen encoder; produces `<run>/controls/` with one row per variant:
baselines (item popularity, KAR ID-only, ID + history), knowledge variants, a positive control whose user text leaks
the answer on purpose ("Liked: " + the titles of the positives in the user's own lists), and negative controls (the
same models fed another user's knowledge or the mean knowledge, and a model trained on texts permuted across users).
Every trained variant runs over several seeds; per-user valid NDCG@5 (test is never read) gives paired bootstrap
intervals of each variant's difference to the baselines. Training is in process (no Ray): the lists are small.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import (
    Fingerprint,
    publish,
    read_marker,
    read_tables,
    require_marker,
    write_json,
)
from rlrf4rec.core.audit import derangement
from rlrf4rec.core.config import BACKBONES, ConfigError, RunConfig, dump_config
from rlrf4rec.core.layout import ITEM_KNOWLEDGE, PER_USER_JSON, TABLE_JSON, TABLE_MD
from rlrf4rec.core.metrics import RANKED_METRICS, RERANK_KS, list_mean, paired_list_mean_ci
from rlrf4rec.core.prompts import user_knowledge_text
from rlrf4rec.core.recommender import (
    KnowledgeInput,
    RerankTask,
    train_model,
)
from rlrf4rec.core.stage import Option, Stage
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
    from rlrf4rec.core.history import user_history_texts
    from rlrf4rec.core.knowledge import embedding_cache, encode_user_texts, make_encoder

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
    from rlrf4rec.core.history import teacher_texts, user_history_texts

    histories = user_history_texts(cfg)
    profiles = teacher_texts(cfg, max_items)
    return {u: user_knowledge_text(histories[u], p, cfg.knowledge.history_text) for u, p in profiles.items()}


def metadata_item_knowledge(cfg: RunConfig, task: RerankTask) -> torch.Tensor:
    """[num_items + 1, D] metadata item knowledge, written as the encode stage writes it (to its own directory when
    the run's knowledge.item is another kind, whose artifact the pipeline's re-rankers read)."""
    from rlrf4rec.core.scoring import item_knowledge_matrix
    from rlrf4rec.stages.encode import write_item_knowledge

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
    from rlrf4rec.core.lineage import start_policy

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
    from rlrf4rec.core.recommender import model_spec

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
    fingerprint = Fingerprint(
        "controls",
        cfg.section_hashes("models", "encode", "knowledge", "recommender", "seed"),
        {"data": marker["fingerprint"]},
        {"seeds": seeds},
    )

    def write(tmp: Path, stats: dict) -> None:
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

    # A measurement: written anew on every call, the variants' models trained above.
    stage_dir = publish(cfg.layout.controls(name), fingerprint, write, dump_config(cfg), force=True)
    print(settings_line(cfg, seed_list) + "\n\n" + markdown_table(rows))
    return stage_dir


def _metrics(task: RerankTask, scores: np.ndarray, split: str = "valid") -> dict[str, np.ndarray]:
    from rlrf4rec.core.metrics import rank_metrics

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
                pair = paired_list_mean_ci(np.mean(per_seed, axis=0), np.mean(values[base], axis=0), num_samples, seed)
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


def backbone_table(tables: list[list[dict]]) -> str:
    """Controls tables of several runs of `rlrf4rec controls` (rows carrying "backbone" and "metrics"), side by side:
    one line per backbone and variant, every NDCG/MAP@k (mean of seeds), the NDCG@5 seed spread and its paired
    difference to ID + history."""

    def ci(x):
        return "" if x is None else f"{x[0]:+.4f} [{x[1]:+.4f}, {x[2]:+.4f}]"

    head = "| backbone | variant | " + " | ".join(RANKED_METRICS) + f" | {METRIC} sd | {METRIC} vs ID + history |"
    lines = [head, "|" + "---|" * (len(RANKED_METRICS) + 4)]
    for rows in tables:
        for r in rows:
            if "metrics" not in r:  # written before every metric was kept
                continue
            values = " | ".join(f"{r['metrics'][m]:.4f}" for m in RANKED_METRICS)
            lines.append(
                f"| {r.get('backbone', 'prm')} | {r['variant']} | {values} | {r['seed_spread']:.4f} | "
                f"{ci(r.get('vs ID + history'))} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- the stage record


def _command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    if args.llm_texts:
        print(f"llm texts: {write_llm_texts(cfg)}")
    if args.signal:
        from rlrf4rec.stages.signal import run_signal_audit

        seeds = 8 if args.seeds is None else args.seeds
        return [run_signal_audit(cfg, policy=args.policy, samples=args.samples, seeds=seeds, name=args.name)]
    if args.reliability is not None:
        from rlrf4rec.stages.reliability import run_reward_reliability

        seeds = max(2 if args.seeds is None else args.seeds, 2)
        stage_dir = run_reward_reliability(cfg, args.reliability, seeds=seeds, name=args.name)
        print(json.dumps(read_marker(stage_dir)["stats"], indent=1))
        return []
    only = None if args.variants is None else [v.strip() for v in args.variants.split(";")]
    unknown = sorted(set(only or ()) - {v.name for v in VARIANTS})
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; choose from {[v.name for v in VARIANTS]}")
    seeds = 3 if args.seeds is None else args.seeds
    if seeds < 1:
        raise ConfigError(f"--seeds={seeds}: use at least 1 seed (3 for intervals worth reading)")
    if args.backbones is None:
        return [run_controls(cfg, seeds=seeds, only=only, name=args.name)]
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = sorted(set(backbones) - set(BACKBONES))
    if unknown or not backbones:
        raise ConfigError(f"--backbones: unknown {unknown or args.backbones!r}; choose from {list(BACKBONES)}")
    tables = []
    for backbone in backbones:
        bcfg = dataclasses.replace(cfg, recommender=dataclasses.replace(cfg.recommender, backbone=backbone))
        stage_dir = run_controls(bcfg, seeds=seeds, only=only, name=f"{args.name}-{backbone}")
        tables.append(json.loads((stage_dir / TABLE_JSON).read_text()))
    print(backbone_table(tables))
    return []


STAGE = Stage(
    "controls",
    "baselines, knowledge variants and positive/negative knowledge controls on valid users",
    _command,
    (
        Option(
            ("--seeds",),
            {
                "type": int,
                "help": "training seeds per variant (seed, seed + 1, ...; default 3), reward models per judge "
                "pair with --signal (default 8: 4 per judge), per reliability measurement (default 2)",
            },
        ),
        Option(("--variants",), {"help": "variant names separated by ; (default: all; see rlrf4rec.stages.controls)"}),
        Option(("--name",), {"default": "main", "help": "output directory <run>/controls/<name>/"}),
        Option(
            ("--backbones",),
            {
                "help": "re-ranker backbones separated by , (e.g. prm,setrank,dlcm,sasrec): one table per "
                "backbone in <run>/controls/<name>-<backbone>/ and a side-by-side table (default: "
                "recommender.backbone)"
            },
        ),
        Option(
            ("--reliability",),
            {"type": Path, "help": "a generate stage dir: measure reward ties and seed agreement on its texts"},
        ),
        Option(
            ("--signal",),
            {
                "action": "store_true",
                "help": "the reward signal audit on valid users (no DPO): label validity, best-of-n ceiling, "
                "feature associations, own vs other text, under two disjoint reward ensembles "
                "(<run>/controls/signal-<name>/)",
            },
        ),
        Option(("--samples",), {"type": int, "default": 16, "help": "texts per valid user for --signal"}),
        Option(("--policy",), {"help": "the policy whose texts --signal audits (default: models.llm)"}),
        Option(
            ("--llm-texts",),
            {
                "action": "store_true",
                "help": "first write one base-policy text per train and valid user, as the encode stage does "
                "(the base LLM rows need them)",
            },
        ),
    ),
    on_ray=lambda cfg, args: (args.llm_texts or args.signal) and cfg.generate.engine == "vllm",
    upstream=("data", "encode"),
)

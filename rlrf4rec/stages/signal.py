"""The reward signal audit, `rlrf4rec controls --signal`: before DPO is asked to learn from the reward, does the
reward carry a signal a policy could learn from its own samples? (No DPO runs here.)

Consumes the data stage, the base policy's texts (the reward models' training knowledge, as the base recommender's)
and a policy (the base LLM by default); produces `<run>/controls/signal-<name>/` (audit.json, audit.md) from
`samples` texts per valid user (in `signal-texts-<policy>-<samples>/`: resumable, shared by audits of other
settings). Each valid user's lists are split in two halves by a seeded hash; judge A, the mean of seeds
0 .. K/2 - 1 of the run's reward model, scores every text on half A; judge B, seeds K/2 .. K - 1, on half B.
Reported (rlrf4rec.core.audit): label validity (B agrees with A's best-vs-worst pair), the best-of-n ceiling for
n = 2, 4, 8, 16, the within-user association of the reward with text features (length, truncated, off topic, genre
words, titles from the prompt named), and under judge B a user's own text against another user's, an empty text and
the prompt's history text in the preference's place. The judges train in process (no Ray), as the other controls;
their epochs are selected on all valid lists, the same for both judges.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import torch

from rlrf4rec.core import assets, audit
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import Fingerprint, publish, read_parquet, read_tables, require_marker, write_json
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.layout import AUDIT_JSON, AUDIT_MD, GENERATIONS
from rlrf4rec.core.prompts import user_knowledge_text
from rlrf4rec.core.protocol import stable_seed
from rlrf4rec.core.recommender import RerankTask
from rlrf4rec.core.stage import Stage

log = logging.getLogger(__name__)

CEILING_NS = (2, 4, 8, 16)
FEATURES = ("words", "truncated", "off_topic", "genre_words", "titles_named")


def list_halves(task: RerankTask, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Valid user -> (indices of its valid lists in half A, in half B), by a seeded hash of (user, list number);
    users whose lists all land in one half are left out (they have nothing to judge on one side)."""
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(task.list_users["valid"]):
        by_user.setdefault(u, []).append(i)
    halves = {}
    for u, rows in by_user.items():
        side = np.array([stable_seed(seed, "signal-half", u, k) % 2 for k in range(len(rows))])
        if 0 < side.sum() < len(rows):
            halves[u] = (np.array(rows)[side == 0], np.array(rows)[side == 1])
    return halves


class Judge:
    """The mean reward of several frozen re-rankers on one half of each valid user's lists."""

    def __init__(self, models: list, task: RerankTask, metric: str, knowledge: dict, segments: int, half: dict):
        from rlrf4rec.core.scoring import RewardModel

        self.members = []
        for model in models:
            rm = RewardModel(task, model, metric, item_knowledge=knowledge.get("item"), user_segments=segments)
            rm.by_user = {u: ("valid", torch.as_tensor(idx, dtype=torch.long)) for u, idx in half.items()}
            self.members.append(rm)

    def score(self, users: list[str], vectors: np.ndarray) -> np.ndarray:
        return np.mean([m.score(users, vectors) for m in self.members], axis=0)


def text_features(text: str, flags: list[str], genres: list[str], titles: list[str]) -> list[float]:
    """FEATURES of one text: word count, truncated and off-topic flags, distinct genre names and distinct titles of
    the user's prompt history named in it."""
    lower = text.lower()
    words = set(re.findall(r"[a-z0-9\-']+", lower))
    genre_hits = sum(g in words or (" " in g and g in lower) for g in genres)
    title_hits = sum(t in lower for t in titles)
    return [len(text.split()), float("truncated" in flags), float("off_topic" in flags), genre_hits, title_hits]


def prompt_titles(cfg: RunConfig, tables: dict, users: list[str]) -> dict[str, list[str]]:
    """user -> the lower-cased titles (4+ characters) of the items its generation prompt names."""
    title = dict(zip(tables["items"].column(S.ITEM_ID).to_pylist(), tables["items"].column(S.TITLE).to_pylist()))
    k = cfg.generate.prompt_history
    wanted, out = set(users), {}
    for r in tables["sequences"].select([S.USER_ID, S.ITEM_IDS, S.HISTORY_START, S.HISTORY_END]).to_pylist():
        if r[S.USER_ID] in wanted:
            start = r[S.HISTORY_START] if k is None else max(r[S.HISTORY_START], r[S.HISTORY_END] - k)
            names = [title[i].lower().strip() for i in r[S.ITEM_IDS][start : r[S.HISTORY_END]]]
            out[r[S.USER_ID]] = sorted({n for n in names if len(n) >= 4})
    return out


def audit_texts(cfg: RunConfig, policy: str | None, samples: int) -> Path:
    """`samples` texts of the policy for every valid user (a generate stage: resumable, skipped when complete)."""
    from rlrf4rec.core.lineage import GenerationRequest, start_policy
    from rlrf4rec.stages.generate import run_generate

    model_path = assets.resolve(policy, assets.asset_home(cfg.assets.home)) if policy else start_policy(cfg)
    request = GenerationRequest(str(model_path), "audit", ("valid",), num_samples=samples)
    # Keyed by policy and N, not by the audit's name: audits of other knowledge or reward settings share them.
    out = cfg.layout.controls(f"signal-texts-{'base' if policy is None else Path(policy).name}-{samples}")
    return run_generate(cfg, request, out=out)


def signal_audit(cfg: RunConfig, texts_dir: Path, *, samples: int, seeds: int, policy: str | None = None) -> dict:
    """The audit (see the module docstring) of the texts in `texts_dir` (audit_texts)."""
    from rlrf4rec.core.history import prompt_history_texts, user_history_texts
    from rlrf4rec.core.knowledge import embedding_cache, encode_user_texts, make_encoder
    from rlrf4rec.core.lineage import start_policy
    from rlrf4rec.core.recommender import model_spec, train_model
    from rlrf4rec.stages.reliability import base_knowledge

    tables = read_tables(cfg.layout.data)
    task = RerankTask(tables, model_spec(cfg.recommender))
    halves = list_halves(task, cfg.seed)
    gens = read_parquet(texts_dir / GENERATIONS, S.GENERATIONS)
    text, flags = {}, {}
    for u, k, t, f in zip(*(gens.column(c).to_pylist() for c in (S.USER_ID, S.SAMPLE_IDX, S.PREFERENCE_TEXT, S.FLAGS))):
        text[(u, k)], flags[(u, k)] = t, f
    users = sorted(u for u in halves if all((u, k) in text for k in range(samples)))
    log.info("signal: %d valid users with both halves and all %d texts", len(users), samples)

    encoder, cache = make_encoder(cfg), embedding_cache(cfg)
    knowledge = base_knowledge(cfg, task, encoder, cache)
    started = time.perf_counter()
    models = [train_model(task, knowledge, cfg.seed + i)[0] for i in range(seeds)]
    fit_seconds = time.perf_counter() - started
    metric, segments = cfg.reward.metric, cfg.knowledge.user_segments
    judge_a = Judge(models[: seeds // 2], task, metric, knowledge, segments, {u: halves[u][0] for u in users})
    judge_b = Judge(models[seeds // 2 :], task, metric, knowledge, segments, {u: halves[u][1] for u in users})

    histories, with_history = user_history_texts(cfg), cfg.knowledge.history_text

    def vectors(owners: list[str], preferences: list[str]) -> np.ndarray:
        """Each owner's knowledge text with that preference text, encoded as the judges read it."""
        knowledge_texts = [user_knowledge_text(histories[u], t, with_history) for u, t in zip(owners, preferences)]
        return encode_user_texts(encoder, knowledge_texts, segments, cache)

    rows = [(u, k) for u in users for k in range(samples)]
    row_users = [u for u, _ in rows]
    row_vectors = vectors(row_users, [text[r] for r in rows])
    a = judge_a.score(row_users, row_vectors).reshape(len(users), samples)  # [U, N]
    b = judge_b.score(row_users, row_vectors).reshape(len(users), samples)

    genres = sorted({g.lower() for gs in tables["items"].column(S.GENRES).to_pylist() for g in gs})
    titles = prompt_titles(cfg, tables, users)
    feats = np.array([text_features(text[r], flags[r], genres, titles[r[0]]) for r in rows]).reshape(
        len(users), samples, len(FEATURES)
    )
    boot, seed = cfg.loop.bootstrap_samples, cfg.seed
    # Sample 0 of each user in the preference's place, against: another user's sample 0 (a derangement), nothing,
    # and the history text its prompt named; the history text of the user's own window follows every one of them.
    source = audit.derangement(len(users), stable_seed(cfg.seed, "signal-other") % 2**32)
    prompts = prompt_history_texts(cfg)
    swapped = {
        "own": [text[(u, 0)] for u in users],
        "other user's": [text[(users[j], 0)] for j in source],
        "empty": ["" for _ in users],
        "history template": [prompts[u] for u in users],
    }
    under_b = {kind: judge_b.score(users, vectors(users, ts)) for kind, ts in swapped.items()}
    result = {
        "users": len(users),
        "samples": samples,
        "metric": metric,
        "seeds": {
            "A": [cfg.seed + i for i in range(seeds // 2)],
            "B": [cfg.seed + i for i in range(seeds // 2, seeds)],
        },
        "knowledge_text": "preference + history" if with_history else "preference only",
        "policy": str(policy) if policy else start_policy(cfg),
        "label_validity": audit.label_validity(a, b, boot, seed),
        "best_of_n": {str(n): v for n, v in audit.best_of_n_ceiling(a, b, CEILING_NS, boot, seed).items()},
        "features": {f: audit.within_user_association(feats[:, :, i], b, boot, seed) for i, f in enumerate(FEATURES)},
        "feature_means": {f: float(feats[:, :, i].mean()) for i, f in enumerate(FEATURES)},
        "swaps": {kind: float(v.mean()) for kind, v in under_b.items()},
        "own_minus": {
            kind: audit.paired_difference(under_b["own"], v, boot, seed) for kind, v in under_b.items() if kind != "own"
        },
        "within_user_spread_b": float(np.ptp(b, axis=1).mean()),
        "fit_seconds": round(fit_seconds, 1),
    }
    return result


def _ci(x: dict) -> str:
    if x.get("mean") is None:
        return "n/a"
    return f"{x['mean']:+.4f} [{x['ci'][0]:+.4f}, {x['ci'][1]:+.4f}] ({x['users']} users)"


def audit_markdown(r: dict) -> str:
    v = r["label_validity"]
    lines = [
        f"Signal audit: {r['users']} valid users x {r['samples']} texts of {r['policy']}; reward {r['metric']}; "
        f"knowledge text: {r['knowledge_text']}; judge A seeds {r['seeds']['A']} on half A of each user's lists, "
        f"judge B seeds {r['seeds']['B']} on half B.",
        "",
        "| measure | value [95% CI over users] |",
        "|---|---|",
        f"| label validity (B agrees with A's best vs worst; 0.5 = no signal) | {v['mean']:.3f} "
        f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] ({v['users']} users, {v['tied_users']} tied under A) |"
        if v["mean"] is not None
        else "| label validity | n/a (every user tied under A) |",
    ]
    for n, x in r["best_of_n"].items():
        lines.append(f"| best-of-{n} ceiling under B (A's pick minus a random text) | {_ci(x)} |")
    for f, x in r["features"].items():
        lines.append(f"| within-user Spearman(B reward, {f}); mean {r['feature_means'][f]:.2f} | {_ci(x)} |")
    for kind, value in r["swaps"].items():
        lines.append(f"| B reward with the {kind} text | {value:.4f} |")
    for kind, x in r["own_minus"].items():
        lines.append(f"| own text minus {kind} text under B | {_ci(x)} |")
    return "\n".join(lines) + "\n"


def run_signal_audit(
    cfg: RunConfig, *, policy: str | None = None, samples: int = 16, seeds: int = 8, name: str = "main"
) -> Path:
    """`signal_audit` written to `<run>/controls/signal-<name>/` (audit.json, audit.md); prints the table. Skipped
    when complete for the same settings, texts and seeds."""
    from rlrf4rec.stages.data import require_data

    if samples < 2 or seeds < 2 or seeds % 2:
        raise ValueError(f"--samples={samples}, --seeds={seeds}: use 2+ samples and an even number of seeds (2+)")
    data_marker = require_data(cfg, "controls --signal")
    texts_dir = audit_texts(cfg, policy, samples)
    fingerprint = Fingerprint(
        "signal",
        cfg.section_hashes("models", "encode", "knowledge", "recommender", "reward", "seed"),
        {"data": data_marker["fingerprint"], "texts": require_marker(texts_dir, "generate")["fingerprint"]},
        {"seeds": seeds},
    )

    def build(tmp: Path, stats: dict) -> None:
        result = signal_audit(cfg, texts_dir, samples=samples, seeds=seeds, policy=policy)
        write_json(result, tmp / AUDIT_JSON)
        (tmp / AUDIT_MD).write_text(audit_markdown(result))
        stats.update({"users": result["users"], "label_validity": result["label_validity"]["mean"]})

    stage_dir = publish(cfg.layout.controls(f"signal-{name}"), fingerprint, build, dump_config(cfg))
    print((stage_dir / AUDIT_MD).read_text())
    return stage_dir


STAGE = Stage(
    "signal",
    "the reward signal audit (controls --signal): two disjoint judges on halves of the lists",
    upstream=("data", "encode", "generate"),
    inside="controls",
)

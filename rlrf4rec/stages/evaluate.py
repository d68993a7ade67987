"""Final evaluation on test users (METHOD.md section 9), read once at the end of a run.

Consumes the recommender stages (ID-only, the base one, one per round) and, for each policy, one text per test user
(`loop.test_texts`: sampled with generate's settings and a per-user seed shared by every policy, or greedy);
produces `<run>/evaluate/` with per-user NDCG@{1,3,5,7} / MAP@{1,3,5,7} for every variant, their means with
bootstrap 95% intervals over test users (`table.json`) and paired differences (`paired.json`). Each round's policy
gets two rows: "DPO round t" pairs its texts with the recommender retrained in that round (the paper's full round,
what a deployment would serve); "DPO round t, fixed re-ranker" scores its texts with the frozen base re-ranker that
scored the base policy, so its paired difference to "base LLM" answers whether the new policy's text is better for
a fixed recommender, free of the retrain's own variance. `rows.json` says which texts and re-ranker each row read
and the off-topic share of those texts. Knows nothing about how the report looks.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import (
    Fingerprint,
    model_identity,
    publish,
    read_parquet,
    require_marker,
    write_json,
    write_parquet,
)
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.knowledge import TextEncoder, embedding_cache, make_encoder
from rlrf4rec.core.layout import EVAL_ROWS, FIXED, GENERATIONS, PAIRED, PER_USER_PARQUET, TABLE_JSON, TEST_TEXTS
from rlrf4rec.core.lineage import GenerationRequest, read_rounds, round_policy, start_policy
from rlrf4rec.core.metrics import RANKED_METRICS, RERANK_KS, bootstrap_ci, rank_metrics
from rlrf4rec.core.prompts import user_knowledge_text
from rlrf4rec.core.recommender import RerankTask
from rlrf4rec.core.scoring import RewardModel
from rlrf4rec.core.stage import FORCE, Stage, on_ray

log = logging.getLogger(__name__)


def per_user_metrics(model: RewardModel, users: list[str], vectors: np.ndarray | None) -> dict[str, np.ndarray]:
    """Test lists of `users` scored with each user's knowledge vector (None: ID-only) -> metric -> [U] user means."""
    task = model.task
    data = task.splits["test"]
    row_of = {u: i for i, u in enumerate(users)}
    owner = torch.tensor([row_of[u] for u in task.list_users["test"]], dtype=torch.long)
    with torch.inference_mode():
        knowledge = model.knowledge(None if vectors is None else torch.from_numpy(vectors))
        batch = dataclasses.replace(data, user_row=owner if vectors is not None else torch.zeros_like(owner))
        logits = task.logits(model.model, batch, knowledge)
    return _per_user(task, logits.numpy(), users)


def popularity_metrics(task: RerankTask, users: list[str]) -> dict[str, np.ndarray]:
    """Test lists ranked by item popularity among train users (no learning) -> metric -> [U] user means."""
    return _per_user(task, task.popularity_scores("test"), users)


def _per_user(task: RerankTask, scores: np.ndarray, users: list[str]) -> dict[str, np.ndarray]:
    data = task.splits["test"]
    row_of = {u: i for i, u in enumerate(users)}
    owner = np.array([row_of[u] for u in task.list_users["test"]])
    per_list = rank_metrics(scores, data.labels.numpy(), ks=RERANK_KS, mask=(data.candidates != 0).numpy())
    counts = np.bincount(owner, minlength=len(users))
    return {
        m: np.bincount(owner, weights=per_list[m], minlength=len(users)) / np.maximum(counts, 1) for m in RANKED_METRICS
    }


def summarize(per_user: dict[str, np.ndarray], num_samples: int, seed: int) -> dict[str, list[float]]:
    """metric -> [mean, ci_low, ci_high] over users."""
    return {m: list(bootstrap_ci(v, num_samples=num_samples, seed=seed)) for m, v in per_user.items()}


PAIRED_BASELINES = ("popularity", "KAR ID-only", "ID only", "base LLM", "SFT warm start")  # the last: loop.init sft


def paired_differences(rows: dict[str, dict[str, np.ndarray]], num_samples: int, seed: int) -> dict:
    """variant -> baseline -> metric -> [mean difference, ci_low, ci_high] over the same test users (paired), and
    "resolved": whether the interval excludes 0. Baselines: PAIRED_BASELINES present in `rows`."""
    out: dict = {}
    for name, metrics in rows.items():
        for base in PAIRED_BASELINES:
            if base == name or base not in rows:
                continue
            diffs = {m: list(bootstrap_ci(metrics[m] - rows[base][m], num_samples, seed=seed)) for m in RANKED_METRICS}
            for m, (_, low, high) in diffs.items():
                diffs[m].append(bool(low > 0 or high < 0))
            out.setdefault(name, {})[base] = diffs
    return out


def policy_test_texts(cfg: RunConfig, name: str, policy: str | Path) -> tuple[dict[str, str], float]:
    """One text per test user from `policy` (resumable, under evaluate.texts/<name>): sampled with generate's
    settings (each user's seed is the same for every policy, so policies are compared on common random numbers) or
    greedy, by loop.test_texts. Returns user -> text and the share of those texts flagged off topic."""
    from rlrf4rec.stages.generate import run_generate

    request = GenerationRequest(str(policy), name, ("test",), num_samples=1, greedy=cfg.loop.test_texts == "greedy")
    gen_dir = run_generate(cfg, request, out=cfg.layout.evaluate_texts(name))
    gens = read_parquet(gen_dir / GENERATIONS, S.GENERATIONS)
    text_of = dict(zip(gens.column(S.USER_ID).to_pylist(), gens.column(S.PREFERENCE_TEXT).to_pylist()))
    flags = gens.column(S.FLAGS).to_pylist()
    return text_of, float(np.mean(["off_topic" in f for f in flags])) if flags else 0.0


@dataclasses.dataclass
class TestScoring:
    """What scoring policies' texts on the test users needs, read once: the base re-ranker (whose lists every model
    shares), the test users, their history texts, the encoder and the embedding cache."""

    cfg: RunConfig
    base: RewardModel
    users: list[str]
    histories: dict[str, str]
    encoder: TextEncoder
    cache: object

    @classmethod
    def load(cls, cfg: RunConfig) -> TestScoring:
        from rlrf4rec.core.history import user_history_texts

        base = RewardModel.load(cfg.layout.recommender("base"), cfg.layout.data, require_knowledge=False)
        users = sorted(set(base.task.list_users["test"]))
        return cls(cfg, base, users, user_history_texts(cfg), make_encoder(cfg), embedding_cache(cfg))

    def model(self, recommender: Path) -> RewardModel:
        """A recommender stage's model over the base model's lists (the data tables are read once)."""
        if Path(recommender) == self.cfg.layout.recommender("base"):
            return self.base
        return RewardModel.load(recommender, self.cfg.layout.data, require_knowledge=False, task=self.base.task)

    def knowledge_texts(self, text_of: dict[str, str] | None) -> list[str]:
        """Each test user's knowledge text: the history text, with the user's policy text (text_of) where given."""
        with_history = self.cfg.knowledge.history_text
        return [user_knowledge_text(self.histories[u], (text_of or {}).get(u), with_history) for u in self.users]

    def score(self, model: RewardModel, texts: list[str] | None) -> dict[str, np.ndarray]:
        """Per test user metrics of `model` with those knowledge texts (None: no user knowledge)."""
        vectors = None if texts is None else model.encode(self.encoder, texts, self.cache)
        return per_user_metrics(model, self.users, vectors)


def run_evaluate(cfg: RunConfig, policies: list[tuple[str, str, Path]], *, force: bool = False) -> Path:
    """policies: [(row name, policy model path, recommender stage dir)], each evaluated with its test texts under
    its own recommender and, where that is not the base one, under the base re-ranker too."""
    layout = cfg.layout
    baselines = [v for v in ("id-kar", "id", "base") if v != "id-kar" or layout.recommender(v).is_dir()]
    upstream = {
        f"recommender/{v}": require_marker(layout.recommender(v), "train-recommender")["fingerprint"] for v in baselines
    }
    for name, policy, recommender in policies:
        upstream[f"{name}: recommender"] = require_marker(recommender, "loop")["fingerprint"]
        upstream[f"{name}: policy"] = model_identity(str(policy))
    fingerprint = Fingerprint("evaluate", cfg.section_hashes("generate", "encode", "loop"), upstream)
    return publish(layout.evaluate, fingerprint, partial(_evaluate, cfg, policies), dump_config(cfg), force=force)


def _evaluate(cfg: RunConfig, policies: list[tuple[str, str, Path]], tmp: Path, stats: dict) -> None:
    layout = cfg.layout
    test = TestScoring.load(cfg)
    test_users, base = test.users, test.base
    rows: dict[str, dict[str, np.ndarray]] = {}
    id_model = test.model(layout.recommender("id"))
    rows["popularity"] = popularity_metrics(id_model.task, test_users)
    if layout.recommender_model("id-kar").is_file():
        rows["KAR ID-only"] = test.score(test.model(layout.recommender("id-kar")), None)
    rows["ID only"] = test.score(id_model, None)
    if cfg.knowledge.user == "history":  # else the base recommender never saw a history text alone
        rows["history knowledge (no LLM)"] = test.score(base, test.knowledge_texts(None))
    texts: dict[str, list[str]] = {}
    scored_by = {"popularity": "none (train-user count)", "KAR ID-only": "id-kar", "ID only": "id"}
    info: dict[str, dict] = {name: {"texts": None, "re-ranker": scored_by.get(name, "base")} for name in rows}
    if "history knowledge (no LLM)" in info:
        info["history knowledge (no LLM)"]["texts"] = "history text"
    for name, policy, recommender in policies:
        text_of, off_topic = policy_test_texts(cfg, name, policy)
        texts[name] = [text_of.get(u, "") for u in test_users]
        knowledge_texts = test.knowledge_texts(text_of)
        shown = {"texts": f"{cfg.loop.test_texts} ({name})", "off_topic_share": off_topic}
        model = test.model(recommender)
        rows[name] = test.score(model, knowledge_texts)
        info[name] = {**shown, "re-ranker": Path(recommender).name}
        if model is not base:
            rows[name + FIXED] = test.score(base, knowledge_texts)
            info[name + FIXED] = {**shown, "re-ranker": "base (fixed)"}
    table = {name: summarize(v, cfg.loop.bootstrap_samples, cfg.seed) for name, v in rows.items()}
    paired = paired_differences(rows, cfg.loop.bootstrap_samples, cfg.seed)
    write_json(table, tmp / TABLE_JSON)
    write_json(paired, tmp / PAIRED)
    per_user = pa.table(
        {
            "variant": [n for n in rows for _ in test_users],
            S.USER_ID: [u for _ in rows for u in test_users],
            **{m: np.concatenate([rows[n][m] for n in rows]) for m in RANKED_METRICS},
        }
    )
    write_parquet(per_user, tmp / PER_USER_PARQUET)
    write_json({name: dict(zip(test_users, t)) for name, t in texts.items()}, tmp / TEST_TEXTS)
    write_json(info, tmp / EVAL_ROWS)
    stats.update({"test_users": len(test_users), **{f"{n}/ndcg@5": table[n]["ndcg@5"][0] for n in table}})


def fixed_reranker_test(cfg: RunConfig, policies: list[tuple[str, str | Path]]) -> dict[str, dict]:
    """Each (name, policy)'s test texts (policy_test_texts: resumable, under evaluate.texts/<name>) scored by the
    frozen base re-ranker, the texts the only difference between rows: name -> {"ndcg@5": [mean, low, high],
    "vs_first": the paired difference to the first policy's row [mean, low, high], "off_topic_share"}; and a
    "popularity" row. Computed in process from the stage directories; writes nothing but the texts."""
    test = TestScoring.load(cfg)
    n, seed = cfg.loop.bootstrap_samples, cfg.seed
    ndcg = {"popularity": popularity_metrics(test.base.task, test.users)["ndcg@5"]}
    out: dict[str, dict] = {}
    for name, policy in policies:
        text_of, off_topic = policy_test_texts(cfg, name, policy)
        ndcg[name] = test.score(test.base, test.knowledge_texts(text_of))["ndcg@5"]
        out[name] = {"off_topic_share": off_topic}
    first = policies[0][0]
    for name, values in ndcg.items():
        row = out.setdefault(name, {})
        row["ndcg@5"] = list(bootstrap_ci(values, num_samples=n, seed=seed))
        row["vs_first"] = list(bootstrap_ci(values - ndcg[first], num_samples=n, seed=seed))
    return out


# --------------------------------------------------------------------------------------------------- the stage record


# The evaluation row of the policy the rounds start from (loop.init).
START_ROWS = {"base": "base LLM", "sft": "SFT warm start"}


def evaluate_rounds(cfg: RunConfig, *, force: bool = False) -> Path:
    """Test users, read once: popularity and the ID-only re-rankers, the start policy and each round's (policy,
    recommender) from the rounds manifest."""
    layout = cfg.layout
    policies = [(START_ROWS[cfg.loop.init], start_policy(cfg), layout.recommender("base"))]
    policies += [
        (r.row, str(round_policy(layout, r)), layout.recommender(r.version))
        for r in read_rounds(layout, rounds=cfg.loop.rounds)
    ]
    return run_evaluate(cfg, policies, force=force)


STAGE = Stage(
    "evaluate",
    "test users, once: popularity, ID-only, base LLM and every DPO round",
    options=(FORCE,),
    on_ray=on_ray,
    in_run=evaluate_rounds,
    upstream=("train-recommender", "loop"),
)

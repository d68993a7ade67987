"""The run directory's layout: every path a stage reads or writes under `<run>/`, named once.

A stage asks `RunLayout` (`cfg.layout`) for its directory and the directories it reads, and names the files inside
them with the constants below; no other module joins a path under the run directory by hand (tests/test_layout.py
holds the package to that). Knows nothing about what the files contain: schema.py has the columns, artifacts.py how
a stage directory is published.

    <run>/data/                      protocol tables (<name>.parquet) + load_report.json
    <run>/knowledge/<name>/          user_knowledge.parquet (base, round<t>) | item_knowledge.parquet (items)
    <run>/cache/                     embeddings-<key>.parquet, one per (encoder, max_length)
    <run>/recommender/<variant>/     model.pt + history.json (id-kar, id, base, round<t>, <variant>-fold<f>)
    <run>/ray_train/<name>/          Ray Train storage (checkpoints of a running fit)
    <run>/generate/                  `rlrf4rec generate`: N texts per user, outside the loop
    <run>/rewards/<name>/            `rlrf4rec reward`; <run>/pairs/<name>/: `rlrf4rec pairs`
    <run>/generations/<policy>-<s>/  the loop's texts per policy and split (train, valid, knowledge)
    <run>/rounds/round<t>/<step>/    reward-train, reward-valid, reward-valid-tuned, pairs; rounds/manifest.json
    <run>/dpo/<name>/model/          the aligned policy (HF directory) + history.json, metrics.json
    <run>/evaluate/                  table.json, paired.json, per_user.parquet, test_texts.json
    <run>/evaluate.texts/<policy>/   the test users' greedy texts of each evaluated policy
    <run>/controls/<name>/           table.json, table.md, per_user.json | reliability.json
    <run>/report/                    report.html, report.md
    <run>/serving/knowledge-<name>/  a knowledge version as memory-mapped files, read by every Serve replica
    <run>/serving/users/             the data stage's history windows and user attributes, memory-mapped likewise
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WRITER_LOCK = ".writer.lock"  # in the run directory: held by the one process writing it (artifacts.writer_lock)

# Files every stage directory holds (artifacts.stage_output writes them).
MARKER = "_COMPLETE.json"
CONFIG = "config.yaml"

# Files inside stage directories.
GENERATIONS = "generations.parquet"
GENERATION_ERRORS = "generation_errors.parquet"
REWARDS = "rewards.parquet"
USER_KNOWLEDGE = "user_knowledge.parquet"
ITEM_KNOWLEDGE = "item_knowledge.parquet"
RECOMMENDER_MODEL = "model.pt"
TRAIN_STATE = "state.pt"  # a Ray Train checkpoint of the recommender fit (and worker_rng: each worker's RNG)
POLICY_MODEL = "model"  # the DPO stage's HF model directory
HISTORY = "history.json"
METRICS = "metrics.json"
LOAD_REPORT = "load_report.json"
DPO_PAIRS = "pairs"  # inside a DPO fit's Ray Train storage: the length-filtered pairs the workers read
DPO_HF = "hf"  # inside a DPO fit's Ray Train storage: the HF trainer's output_dir, shared by all ranks
DPO_TRAIN_PAIRS = "train.parquet"  # in DPO_PAIRS
DPO_EVAL_PAIRS = "eval.parquet"  # in DPO_PAIRS
SFT_EXAMPLES = "examples.parquet"  # the sft stage's (prompt, target) examples
GRPO_PROMPTS = "prompts.parquet"  # the grpo stage's prompts (one per train user), in its stage and its Ray storage
SFT_HF = "hf"  # inside an SFT fit's Ray Train storage: the HF trainer's output_dir
SFT_WORK = "examples"  # inside an SFT fit's Ray Train storage: the split, length-filtered examples the workers read
SFT_TRAIN_EXAMPLES = "train.parquet"  # in SFT_WORK
SFT_EVAL_EXAMPLES = "eval.parquet"  # in SFT_WORK
ARM_PAIRS = "pairs.parquet"  # in `<run>/arms/<name>/<arm>/`: the arm's train pairs, as DPO reads them
RESUMES = "resumed_after.json"  # in a DPO or SFT fit's Ray Train storage: the steps worker groups resumed after
TABLE_JSON = "table.json"
TABLE_MD = "table.md"
PAIRED = "paired.json"
PER_USER_PARQUET = "per_user.parquet"
PER_USER_JSON = "per_user.json"
SHIFT_PER_TEXT = "per_text.parquet"  # shift: per sampled valid text, tokens and log-probs (policy, reference)
TEST_TEXTS = "test_texts.json"
FIXED = ", fixed re-ranker"  # evaluate: suffix of a round's row whose texts the base re-ranker scored
EVAL_ROWS = "rows.json"  # evaluate: per row, which texts and which re-ranker it scored, the texts' off-topic share
RELIABILITY = "reliability.json"
AUDIT_JSON = "audit.json"  # controls --signal
AUDIT_MD = "audit.md"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


# A resumable generate stage's shards live beside it, in `<stage>.parts/` (generate.py): one generations shard and
# one errors shard per finished batch, the published rows of an earlier request set, and what settings made them.
WORK_MARKER = "_WORK.json"
GENERATION_SHARD, ERROR_SHARD = "gen", "err"  # shard name prefixes: <prefix>-<batch index>.parquet
PREVIOUS_SHARD = "gen-previous.parquet"  # sorts after every numbered shard


def parts_dir(stage_dir: Path) -> Path:
    return stage_dir.with_name(f"{stage_dir.name}.parts")


def shard(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.parquet"


def shard_glob(prefix: str) -> str:
    return f"{prefix}-*.parquet"


def worker_rng(rank: int) -> str:
    """A recommender fit checkpoint's random state of worker `rank` (each worker writes its own)."""
    return f"rng-{rank}.pt"


def data_table(name: str) -> str:
    """A protocol table's file in the data stage (schema.TABLES names them)."""
    return f"{name}.parquet"


def pairs_file(split: str) -> str:
    return f"pairs_{split}.parquet"


@dataclass(frozen=True)
class RunLayout:
    """Paths under one run directory. Stage directories are methods; a stage names the files in them."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def relative(self, path: Path) -> str:
        """A stage directory as its run-relative name (what logs print), e.g. `rounds/round0/reward-train`."""
        return str(Path(path).relative_to(self.root)) if Path(path).is_relative_to(self.root) else str(path)

    @property
    def writer_lock(self) -> Path:
        return self.root / WRITER_LOCK

    # data and knowledge
    @property
    def data(self) -> Path:
        return self.root / "data"

    def table(self, name: str) -> Path:
        return self.data / data_table(name)

    def knowledge(self, name: str) -> Path:
        return self.root / "knowledge" / name

    def user_knowledge(self, name: str) -> Path:
        return self.knowledge(name) / USER_KNOWLEDGE

    def item_knowledge(self, name: str = "items") -> Path:
        return self.knowledge(name) / ITEM_KNOWLEDGE

    def embedding_cache(self, key: str) -> Path:
        return self.root / "cache" / f"embeddings-{key}.parquet"

    # recommenders
    @property
    def recommenders(self) -> Path:
        return self.root / "recommender"

    def recommender(self, variant: str) -> Path:
        return self.recommenders / variant

    def recommender_model(self, variant: str) -> Path:
        return self.recommender(variant) / RECOMMENDER_MODEL

    def recommender_versions(self) -> list[Path]:
        """Every complete-or-not recommender stage directory, sorted by name."""
        return sorted(p for p in self.recommenders.glob("*") if p.is_dir())

    def ray_train(self, name: str) -> Path:
        return self.root / "ray_train" / name

    # generation, the rounds, DPO
    @property
    def generate(self) -> Path:
        return self.root / "generate"

    def generations(self, name: str) -> Path:
        return self.root / "generations" / name

    @property
    def rounds(self) -> Path:
        return self.root / "rounds"

    @property
    def manifest(self) -> Path:
        return self.rounds / "manifest.json"

    def round_step(self, t: int, step: str) -> Path:
        return self.rounds / f"round{t}" / step

    def rewards(self, name: str) -> Path:
        """`rlrf4rec reward --name`: a reward stage outside the loop."""
        return self.root / "rewards" / name

    def pairs(self, name: str) -> Path:
        """`rlrf4rec pairs --name`: a pairs stage outside the loop."""
        return self.root / "pairs" / name

    @property
    def sft(self) -> Path:
        """`rlrf4rec sft`: the policy's warm start (model/ inside)."""
        return self.root / "sft"

    def dpo(self, name: str) -> Path:
        return self.root / "dpo" / name

    def policy(self, name: str) -> Path:
        return self.dpo(name) / POLICY_MODEL

    def grpo(self, name: str) -> Path:
        """A GRPO fit (`loop.algorithm: grpo`): model/ (the tuned policy), history.json, prompts.parquet."""
        return self.root / "grpo" / name

    def dpo_histories(self) -> list[Path]:
        return sorted((self.root / "dpo").glob(f"*/{HISTORY}"))

    def recommender_histories(self) -> list[Path]:
        return sorted(self.recommenders.glob(f"*/{HISTORY}"))

    def arms_tables(self) -> list[Path]:
        """Every `rlrf4rec arms --name` directory holding a table, sorted by name."""
        return sorted(p.parent for p in (self.root / "arms").glob(f"*/{TABLE_JSON}"))

    def arms(self, name: str) -> Path:
        """`rlrf4rec arms --name`: DPO arms on one policy's pairs (stages/arms.py)."""
        return self.root / "arms" / name

    def arms_step(self, name: str, *step: str) -> Path:
        """A stage of `rlrf4rec arms --name`: `reward-train`, `reward-valid`, `pairs`, or `<arm>/<step>`."""
        return self.arms(name).joinpath(*step)

    # evaluation and reports
    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    def evaluate_texts(self, policy: str) -> Path:
        return self.root / "evaluate.texts" / policy.replace(" ", "-")

    def controls(self, name: str) -> Path:
        return self.root / "controls" / name

    def control_tables(self) -> list[Path]:
        """Every controls directory holding a finished table, sorted by name."""
        return sorted(
            p.parent for p in (self.root / "controls").glob(f"*/{TABLE_MD}") if (p.parent / TABLE_JSON).is_file()
        )

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def tracking_store(self) -> Path:
        """`rlrf4rec track` without a tracking URI: a local MLflow store inside the run."""
        return self.root / "mlruns"

    def serving_index(self, name: str) -> Path:
        return self.root / "serving" / f"knowledge-{name}"

    @property
    def serving_users(self) -> Path:
        return self.root / "serving" / "users"

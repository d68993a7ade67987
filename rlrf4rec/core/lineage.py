"""Lineage: which policy and which re-ranker each knowledge version of a run comes from, as typed records.

The loop writes one `Round` per round into `<run>/rounds/manifest.json`; evaluate, the report, tracking and serving
read them back through `read_rounds`, never by string keys or by parsing directory names.
`start_policy` is the policy round 0 starts from (loop.init). `GenerationRequest` says which texts a generate stage
writes for a caller (a policy, a name for its rows, splits, users, samples), instead of a patched run config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rlrf4rec.core import assets
from rlrf4rec.core.artifacts import read_manifest, require_marker
from rlrf4rec.core.config import GenerateConfig, RunConfig
from rlrf4rec.core.layout import POLICY_MODEL, RunLayout


def sft_policy(cfg: RunConfig) -> Path:
    """The warm-started policy's model directory (`rlrf4rec sft`)."""
    return cfg.layout.sft / POLICY_MODEL


def start_policy(cfg: RunConfig) -> str:
    """The policy round 0 starts from and the base knowledge is written with (loop.init): models.llm resolved, or
    the sft stage's model, which must be complete."""
    if cfg.loop.init == "sft":
        require_marker(cfg.layout.sft, "sft (loop.init: sft)")
        return str(sft_policy(cfg).resolve())
    return assets.resolve(cfg.models.llm, assets.asset_home(cfg.assets.home))


@dataclass(frozen=True)
class Round:
    """One round of the loop: the policy and re-ranker it started from and made, the reward models that scored its
    texts, its stage directories by step, and what it measured (`stats`: pairs, dpo or grpo, shift, valid_reward,
    recommender_metrics, each the stats of that step)."""

    index: int  # 0-based: round t makes knowledge version round<t+1>
    algorithm: str  # dpo | grpo
    policy_in: str
    policy_out: str
    recommender_in: str
    recommender_out: str
    reward_models: list[str] = field(default_factory=list)  # the reward ensemble's members
    reward_folds: list[list[str]] = field(default_factory=list)  # cross-fitting folds' members
    stages: dict[str, str] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        """The knowledge version this round makes (its re-ranker's and its knowledge's name)."""
        return f"round{self.index + 1}"

    @property
    def row(self) -> str:
        """Its row in the evaluation table."""
        return f"{self.algorithm.upper()} round {self.index + 1}"

    def to_dict(self) -> dict:
        """The manifest's record of the round: the lineage fields, then the measured stats at the top level."""
        lineage = dataclasses.asdict(self)
        stats = lineage.pop("stats")
        return {"round": lineage.pop("index"), **lineage, **stats}

    @classmethod
    def from_dict(cls, record: dict) -> Round:
        names = {f.name for f in dataclasses.fields(cls)} - {"index", "stats"}
        return cls(
            index=record["round"],
            algorithm=record.get("algorithm", "dpo"),  # manifests written before GRPO hold DPO rounds only
            **{k: v for k, v in record.items() if k in names and k != "algorithm"},
            stats={k: v for k, v in record.items() if k not in names | {"round"}},
        )


def read_rounds(layout: RunLayout, rounds: int | None = None) -> list[Round]:
    """The rounds of the manifest (none before the first one finishes); with `rounds`, an error unless that many
    are complete."""
    manifest = read_manifest(layout, rounds=rounds)
    return [] if manifest is None else [Round.from_dict(r) for r in manifest["rounds"]]


@dataclass(frozen=True)
class Version:
    """A knowledge version of a run: the policy that wrote its preference texts, its knowledge stage and its
    re-ranker. `base` is the start policy's; `round<t>` the one round t-1 made."""

    name: str
    policy: str
    knowledge: Path
    recommender: Path


def round_policy(layout: RunLayout, r: Round) -> Path:
    """The policy round `r` made: its DPO (or GRPO) fit's model directory in this run directory (wherever the run
    directory lives now; the manifest's paths are those of the run that wrote it)."""
    fit = layout.grpo(f"round{r.index}") if r.algorithm == "grpo" else layout.dpo(f"round{r.index}")
    return fit / POLICY_MODEL


@dataclass(frozen=True)
class GenerationRequest:
    """Which texts a generate stage writes: `model`'s (a model reference as models.llm takes it), its rows named
    `version`, for the users of `splits` (the first `max_users` of each), `num_samples` each (None: generate's), greedy
    or sampled. The other generation settings are the generate section's."""

    model: str
    version: str
    splits: tuple[str, ...]
    max_users: int | None = None
    num_samples: int | None = None
    greedy: bool = False

    def settings(self, g: GenerateConfig) -> GenerateConfig:
        """The generate section this request runs with."""
        return dataclasses.replace(
            g,
            splits=tuple(self.splits),
            max_users=self.max_users,
            num_samples=g.num_samples if self.num_samples is None else self.num_samples,
            temperature=0.0 if self.greedy else g.temperature,
        )

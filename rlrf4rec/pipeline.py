"""The stages of a run, in order: the table of contents of rlrf4rec.

Each stage is a function `RunConfig -> Path` that writes its artifacts into the run directory (or finds them complete
and returns at once). `rlrf4rec run` calls them in this order; `rlrf4rec <stage>` calls one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from rlrf4rec import assets
from rlrf4rec.config import RunConfig

log = logging.getLogger(__name__)


def run_assets(cfg: RunConfig) -> Path:
    """Fetch and verify the embedded assets the config refers to (none when it names only external ones)."""
    home = assets.asset_home(cfg.assets.home)
    for ref in (cfg.models.llm, cfg.models.encoder, cfg.data.path):
        if ref.startswith(assets.EMBEDDED_PREFIX):
            log.info("assets: %s -> %s", ref, assets.resolve(ref, home))
    return home


def run_data(cfg: RunConfig) -> Path:
    from rlrf4rec.data import run_data as stage

    return stage(cfg)


def run_encode(cfg: RunConfig) -> Path:
    """Base knowledge: one base-policy text per train and valid user + its history text (knowledge.user = llm; the
    history text alone with `history`), and the items' knowledge, encoded by the frozen encoder."""
    from rlrf4rec.encode import run_encode as stage

    return stage(cfg)


def run_recommenders(cfg: RunConfig) -> Path:
    """The baselines (KAR's ID-only re-ranker: candidates alone; ID + history: the user's history window too) and
    the base-knowledge re-ranker (the first reward model), on Ray Train."""
    from rlrf4rec.train import run_recommender

    data_dir = cfg.run_path / "data"
    run_recommender(cfg, "id-kar", data_dir, None, use_history=False)
    run_recommender(cfg, "id", data_dir, None, use_history=True)
    run_recommender(cfg, "base", data_dir, cfg.run_path / "knowledge" / "base" / "user_knowledge.parquet")
    return cfg.run_path / "recommender"


def run_generate(cfg: RunConfig) -> Path:
    from rlrf4rec.generate import run_generate as stage

    return stage(cfg)


def run_loop(cfg: RunConfig) -> Path:
    """`loop.rounds` rounds of generate -> reward -> pairs -> DPO -> retrain the recommender."""
    from rlrf4rec.loop import run_loop as stage

    return stage(cfg)


def run_evaluate(cfg: RunConfig) -> Path:
    """Test users, read once: popularity and the ID-only re-rankers, and each (policy, recommender) of the rounds."""
    import json

    from rlrf4rec.evaluate import run_evaluate as stage

    manifest = json.loads((cfg.run_path / "rounds" / "manifest.json").read_text())
    if len(manifest["rounds"]) != cfg.loop.rounds:
        raise ValueError(f"{len(manifest['rounds'])} of loop.rounds={cfg.loop.rounds} rounds are complete; "
                         "run `rlrf4rec loop` to finish them first")
    policies = [
        (
            "base LLM",
            assets.resolve(cfg.models.llm, assets.asset_home(cfg.assets.home)),
            cfg.run_path / "recommender" / "base",
        )
    ]
    policies += [
        (f"DPO round {r['round'] + 1}", r["policy_out"], Path(r["recommender_out"])) for r in manifest["rounds"]
    ]
    return stage(cfg, policies)


def run_report(cfg: RunConfig) -> Path:
    from rlrf4rec.report import build_report

    return build_report(cfg.run_path)


STAGES: list[tuple[str, Callable[[RunConfig], Path]]] = [
    ("assets", run_assets),
    ("data", run_data),
    ("encode", run_encode),
    ("train-recommender", run_recommenders),
    ("loop", run_loop),
    ("evaluate", run_evaluate),
    ("report", run_report),
]


def run_all(cfg: RunConfig) -> dict[str, Path]:
    outputs = {}
    for name, stage in STAGES:
        log.info("=== stage %s", name)
        outputs[name] = stage(cfg)
    return outputs

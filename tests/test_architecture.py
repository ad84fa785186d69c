"""The layer rule of docs/design.md §3, read from the import graph: no cycle between modules and no
arrow against the layers. Every import counts, at module top or inside a function (a lazy import
is still a dependency), and a package's `__init__` is a module like any other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("dopd_vl", "data_builders")

# Layer -> the layers it may import (its own always). docs/design.md §3 draws the same table.
LAYERS = {
    "core": set(),  # dopd_vl.errors, files, version, distributed, progress
    "method": {"core"},
    "loss": {"core", "method"},
    "data": {"core"},
    "models": {"core"},
    "modality": {"core", "method", "data", "models"},
    "training": {"core", "method", "loss", "data", "models", "modality"},
    "eval": {"core", "method", "loss", "data", "models", "modality", "training"},
    "builders": {"core", "data"},
    "apps": {"core", "method", "loss", "data", "models", "modality", "training", "eval", "builders"},
    "cli": {"core", "method", "loss", "data", "models", "modality", "training", "eval", "builders", "apps"},
    "api": set(),  # dopd_vl/__init__.py: a lazy table of names (strings), importing nothing of ours
}


def layer_of(module: str) -> str:
    if module == "dopd_vl":
        return "api"
    if module.startswith("data_builders"):
        return "builders"
    part = module.split(".")[1]
    return "core" if part in ("errors", "files", "version", "distributed", "progress") else part


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (the most specific module each import names)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a package path: the deepest module we have
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_a_planted_cycle_is_found():
    """The checker itself: a lazy import back to a module's importer is a cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_follows_the_layer_rule():
    wrong = []
    for module, edges in import_graph().items():
        allowed = LAYERS[layer_of(module)] | {layer_of(module)}
        wrong += [f"{module} -> {target}" for target in sorted(edges) if layer_of(target) not in allowed]
    assert not wrong, "imports against the layer rule (docs/design.md §3):\n" + "\n".join(wrong)


def test_the_graph_sees_lazy_imports_inside_functions(tmp_path):
    """A function-level import is an edge too (the cycle the diagnostics once had was one)."""
    graph = import_graph()
    assert "dopd_vl.training.engines" in graph["dopd_vl.cli.options"]  # imported inside vllm_engine()
    assert "dopd_vl.modality.text" in graph["dopd_vl.modality.adapters"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_imports_from_the_top_level_package(package):
    module = __import__(package)
    assert module.__all__, package
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package} lists names it cannot import: {missing}"


def test_design_section_5_lists_exactly_the_public_api():
    import data_builders
    import dopd_vl

    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    section = text[text.index("## 5. Public API") :]
    listed = {name for name in dopd_vl.__all__ if name != "__version__"} | set(data_builders.__all__)
    absent = sorted(name for name in listed if f"`{name}`" not in section)
    assert not absent, f"public names not listed in docs/design.md §5: {absent}"


def test_code_outside_the_packages_imports_only_the_public_api():
    """examples/ and bench/ use `from dopd_vl import ...` / `from data_builders import ...` only, so
    moving a module never breaks them. A line marked `# internal: <why>` is the one exception a
    benchmark may take (it says why, and breaks loudly when the module moves)."""
    wrong = []
    for folder in ("examples", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            lines = source.splitlines()
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and "# internal: " in lines[node.lineno - 1]:
                    continue
                if (
                    isinstance(node, ast.ImportFrom)
                    and (node.module or "").split(".")[0] in PACKAGES
                    and "." in node.module
                ):
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno} from {node.module}")
                if isinstance(node, ast.Import):
                    wrong += [
                        f"{path.relative_to(REPO)}:{node.lineno} import {a.name}"
                        for a in node.names
                        if a.name.split(".")[0] in PACKAGES and "." in a.name
                    ]
    assert not wrong, "\n".join(wrong)


def module_pairs_of_one_concept(stems_by_folder: dict[str, list[str]]) -> list[str]:
    """Module pairs in one folder whose names differ only by a suffix (`checkpoint` / `checkpointer`,
    `routed` / `routed_loss`, `records` / `training_records`): one concept cut in two (design §3)."""
    pairs = []
    for folder, stems in stems_by_folder.items():
        for a in stems:
            for b in stems:
                if a != b and (
                    b in (a + "er", a + "s", a + "ing", a + "ed") or b.startswith(a + "_") or b.endswith("_" + a)
                ):
                    pairs.append(f"{folder}: {a} / {b}")
    return pairs


def test_no_two_modules_are_named_for_one_concept():
    stems: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*")):
            if path.name == "__init__.py" or "__pycache__" in path.parts or path.name == "assets":
                continue
            if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
                folder = str(path.parent.relative_to(REPO))
                stems.setdefault(folder, []).append(path.stem)
    assert module_pairs_of_one_concept(stems) == []


def test_the_pair_rule_finds_a_planted_pair():
    planted = {"training": ["checkpoint", "checkpointer", "trainer"], "loss": ["routed", "routed_loss"]}
    assert sorted(module_pairs_of_one_concept(planted)) == [
        "loss: routed / routed_loss",
        "training: checkpoint / checkpointer",
    ]
    assert module_pairs_of_one_concept({"data": ["records", "training_records", "images", "image_roots"]}) == [
        "data: records / training_records"
    ]


TRAINER_PUBLIC = {"train", "train_step", "apply_update", "save", "run", "step"}
"""A Trainer's public face (design §3, 'Seams'): its methods and the read-only `run` and `step`."""


def trainer_attribute_reads(source: str) -> list[tuple[int, str]]:
    """(line, attribute) of every attribute read on a Trainer outside its public face: on a name
    bound to a `Trainer(...)` call (or named `trainer`), or on such a call itself."""

    def is_trainer_call(node) -> bool:
        return isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Name) and node.func.id == "Trainer")
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "Trainer")
        )

    tree = ast.parse(source)
    names = {"trainer"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and is_trainer_call(node.value):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr not in TRAINER_PUBLIC:
            value = node.value
            if (isinstance(value, ast.Name) and value.id in names) or is_trainer_call(value):
                reads.append((node.lineno, node.attr))
    return sorted(set(reads))


def test_nothing_outside_the_trainer_reads_its_attributes():
    wrong = []
    for folder in (*PACKAGES, "examples", "bench", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "dopd_vl" / "training" / "trainer.py" or "results" in path.parts:
                continue
            reads = trainer_attribute_reads(path.read_text(encoding="utf-8"))
            wrong += [f"{path.relative_to(REPO)}:{line} .{attr}" for line, attr in reads]
    assert not wrong, "\n".join(wrong)


def test_the_trainer_rule_finds_a_planted_read():
    planted = "t = Trainer(c)\nt.models.student\nTrainer(c).config\ntrainer.step\ntrainer.run.models\n"
    assert trainer_attribute_reads(planted) == [(2, "models"), (3, "config")]


def test_the_step_asks_no_engine_what_it_is():
    """The step calls the engine's protocol only: no `hasattr` and no engine name in the trainer."""
    source = (REPO / "dopd_vl" / "training" / "trainer.py").read_text(encoding="utf-8")
    assert "hasattr" not in source and "VllmEngine" not in source and "HFEngine" not in source
    assert "engine.name" not in source and '"vllm"' not in source


def test_the_public_loss_and_objective_functions_say_their_arguments_and_results():
    import importlib
    import inspect

    import dopd_vl

    modules = [
        "dopd_vl.loss.route_terms",
        "dopd_vl.loss.reference",
        "dopd_vl.loss.chunked",
        "dopd_vl.method.objectives",
        "dopd_vl.method.plan",
    ]
    missing = []
    for module in modules:
        for name in dopd_vl._EXPORTS[module]:
            obj = getattr(importlib.import_module(module), name)
            if inspect.isfunction(obj):
                doc = inspect.getdoc(obj) or ""
                returns = inspect.signature(obj).return_annotation not in ("None", None)
                if "\nArgs:\n" not in doc or (returns and "\nReturns:\n" not in doc):
                    missing.append(f"{module}.{name}")
    for extra in ("dopd_vl.method.divergences:token_divergence", "dopd_vl.method.plan:route_tokens"):
        module, name = extra.split(":")
        if "\nArgs:\n" not in (inspect.getdoc(getattr(importlib.import_module(module), name)) or ""):
            missing.append(extra)
    assert missing == []

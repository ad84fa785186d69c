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
    "core": set(),  # dopd_vl.errors, dopd_vl.files, dopd_vl.version, dopd_vl.distributed
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
    return "core" if part in ("errors", "files", "version", "distributed") else part


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
    assert "dopd_vl.training.engines" in graph["dopd_vl.cli.evaluate"]  # imported inside _eval_engine()
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


def test_no_module_is_over_450_lines_without_saying_why():
    long = []
    for name, path in module_files().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > 450 and not any(line.startswith("# Over 450 lines:") for line in lines[:3]):
            long.append(f"{name}: {len(lines)} lines")
    assert not long, long
    assert len((REPO / "dopd_vl" / "training" / "trainer.py").read_text(encoding="utf-8").splitlines()) <= 350


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
    for extra in ("dopd_vl.method.divergences:token_divergence", "dopd_vl.method.routing:route_tokens"):
        module, name = extra.split(":")
        if "\nArgs:\n" not in (inspect.getdoc(getattr(importlib.import_module(module), name)) or ""):
            missing.append(extra)
    assert missing == []

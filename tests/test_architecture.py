"""The package's shape, read from its own source: layers that only point down, no import circles,
no imports inside functions except optional extras, no Lightning below ``lit/``, short functions.

docs/architecture.md has the layer picture; these tests keep the code to it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastsample"

#: top to bottom: a module may import its own package and the packages below it, never above
LAYERS = [
    ("jobs",),
    ("lit", "data"),
    ("schedule_search",),
    ("metrics",),
    ("samplers",),
    ("guidance",),
    ("models",),
    ("diffusion",),
    ("utils",),
]
RANK = {package: len(LAYERS) - depth for depth, group in enumerate(LAYERS) for package in group}
#: third-party packages a function may import lazily: optional extras and heavy tools used by one path
OPTIONAL_EXTRAS = {
    "diffusers",
    "transformers",
    "wandb",
    "k_diffusion",
    "torch_fidelity",
    "cleanfid",
    "optuna",
    "matplotlib",
    "scipy",
    "sklearn",
    "tensorboard",
    "torchvision",
    "hydra_plugins",
}
LIGHTNING = ("pytorch_lightning", "lightning")
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. fastsample.jobs.sampling
    target: str  # imported module (or package), e.g. fastsample.samplers.sampler
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.Import | ast.ImportFrom, source: str, is_package: bool) -> list[str]:
    """Absolute names of what ``node`` imports (``from a import b`` gives ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = source.split(".")[: len(source.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, *([node.module] if node.module else [])])
    names = [f"{base}.{alias.name}" for alias in node.names]
    return [name if module_path(name) else base for name in names]


def module_path(name: str) -> Path | None:
    if not name.startswith("fastsample"):
        return None
    relative = Path(*name.split(".")[1:])
    for candidate in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def collect_imports() -> list[Import]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(node) for function in functions for node in ast.walk(function)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported_modules(node, source, path.name == "__init__.py"):
                    found.append(Import(source, target, node.lineno, id(node) in nested))
    return found


def type_checking_lines() -> set[tuple[str, int]]:
    """(module, line) of imports under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    lines = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                lines.update((module_name(path), child.lineno) for child in ast.walk(node))
    return lines


IMPORTS = collect_imports()
INTERNAL = [i for i in IMPORTS if i.target.startswith("fastsample.")]


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} - {"assets"}
    top_level = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert packages <= set(RANK), f"packages without a layer: {sorted(packages - set(RANK))}"
    assert not top_level, f"modules outside every layer: {sorted(top_level)}"


def test_layers_point_down():
    upward = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in INTERNAL
        if layer(i.source) and layer(i.target) and RANK[layer(i.target)] > RANK[layer(i.source)]
    ]
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_no_import_circles():
    graph: dict[str, set[str]] = defaultdict(set)
    for i in INTERNAL:
        graph[i.source].add(i.target)
    assert not strongly_connected(graph), f"import circles: {strongly_connected(graph)}"


def test_imports_inside_functions_are_optional_extras_only():
    hidden = type_checking_lines()
    lazy = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in IMPORTS
        if i.in_function
        and i.target.split(".")[0] not in OPTIONAL_EXTRAS
        and (i.source, i.line) not in hidden
    ]
    assert not lazy, "imports inside functions (only optional extras may be imported lazily):\n" + "\n".join(
        lazy
    )


@pytest.mark.parametrize("package", ["utils", "diffusion", "models", "guidance", "samplers", "metrics"])
def test_no_lightning_below_lit(package):
    lightning = [
        f"{i.source}:{i.line}"
        for i in IMPORTS
        if layer(i.source) == package and i.target.startswith(LIGHTNING)
    ]
    assert not lightning, f"{package}/ imports Lightning: {lightning}"


def test_functions_are_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph reader itself: a lazy upward import in a parsed snippet is found."""
    tree = ast.parse("def f():\n    from fastsample.jobs.setup import plan\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    (target,) = imported_modules(node, "fastsample.models.unet", is_package=False)
    assert target == "fastsample.jobs.setup"
    assert RANK[layer(target)] > RANK[layer("fastsample.models.unet")]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the import circles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return circles

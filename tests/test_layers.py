"""The package's layers point one way: commands -> engine -> model.

Read from the source with `ast`, so nothing is imported. Every `import` statement counts: at
module level, inside functions (the package imports torch-heavy modules there so `longva
--help` stays fast, but the dependency is as real) and under `TYPE_CHECKING` (a type names the
layer it comes from). Not counted: the parent packages Python runs before a submodule; their
`__init__` files hold docstrings and the lazy front doors of the public API, which are not
where the package's own code gets its names.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "longva_cli"

# Lowest first; a module may import its own layer and the layers below it, nothing above. Whatever
# is not listed (api, display, the commands, serve, niah, eval, train, vllm) is above the engine.
LAYERS = [
    ("helpers", ("longva_cli.errors", "longva_cli.checks", "longva_cli.console", "longva_cli.defaults")),
    ("model", ("longva_cli.model",)),
    ("inputs", ("longva_cli.hub", "longva_cli.media", "longva_cli.parallel", "longva_cli.text_sources")),
    ("engine", ("longva_cli.engine",)),
]


def module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from a import b` names module a.b when it is one)."""
    modules = module_files()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.update(known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else known(base) for alias in node.names)
        graph[name] = {target for target in targets if target is not None and target != name}
    return graph


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return rank
    return len(LAYERS)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_scan_sees_function_level_and_type_checking_imports():
    graph = import_graph()
    assert "longva_cli.engine.loader" in graph["longva_cli.display"]  # imported inside load_model
    assert "longva_cli.model.longva" in graph["longva_cli.engine.session"]  # under TYPE_CHECKING
    assert "longva_cli.media" in graph["longva_cli.engine.encoder"]  # `from longva_cli import media`


def test_no_import_cycle_among_the_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_each_layer_imports_only_itself_and_the_layers_below():
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target}"
        for module, targets in import_graph().items()
        if layer_of(module) < len(LAYERS)
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_nothing_under_model_imports_the_engine_serve_or_a_command():
    graph = import_graph()
    model = {module: targets for module, targets in graph.items() if module.startswith("longva_cli.model")}
    assert len(model) > 10  # the scan found the model package
    allowed = ("longva_cli.model", "longva_cli.errors", "longva_cli.checks", "longva_cli.console")
    reaching_up = {module: sorted(t for t in targets if not t.startswith(allowed)) for module, targets in model.items()}
    assert {module: targets for module, targets in reaching_up.items() if targets} == {}


def test_the_command_packages_do_not_import_one_another():
    """What two commands share lives below them (eval ppl and training read text through text_sources)."""
    packages = ("longva_cli.eval", "longva_cli.niah", "longva_cli.serve", "longva_cli.train")

    def package_of(module: str) -> str | None:
        return next((p for p in packages if module == p or module.startswith(p + ".")), None)

    crossing = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if package_of(module) and package_of(target) not in (None, package_of(module))
    )
    assert crossing == []




def test_no_test_folder_shadows_a_module_the_code_imports():
    """tests/ is on sys.path (for `support`), so a folder there named like a library the code
    imports (`vllm`) would be imported in its place, as an empty namespace package, wherever the
    library is missing; the vLLM tests sit in vllm_plugin/ for that reason."""
    import sys

    tests = Path(__file__).resolve().parent
    imported = set(sys.stdlib_module_names)
    for path in [*PACKAGE.rglob("*.py"), *tests.rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    folders = {folder.name for folder in tests.iterdir() if folder.is_dir() and folder.name != "support"}
    assert "vllm" in imported and not folders & imported

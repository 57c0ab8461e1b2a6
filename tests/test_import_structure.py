"""The package's shape: no import cycles (module-level or inside functions) in ascendspeed/,
megatron_ext/ or tools/; megatron_ext stands alone; user-facing errors come from one leaf module."""
import ast
import os

from conftest import REPO_ROOT

PACKAGES = ("ascendspeed", "megatron_ext", "tools")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file under PACKAGES."""
    modules = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(REPO_ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    dotted = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
                    modules[dotted.removesuffix(".__init__")] = path
    return modules


def _imports(module: str, path: str, known) -> set[str]:
    """Project modules that `module` imports anywhere in its file (functions included)."""
    found = set()
    is_package = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                parts = parts[:len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known and name != module)
    return found


def _graph():
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_megatron_ext_and_errors_import_nothing_of_ours():
    graph = _graph()
    for module, imported in graph.items():
        if module.startswith("megatron_ext"):
            assert all(name.startswith("megatron_ext") for name in imported), (module, imported)
    assert graph["ascendspeed.errors"] == set()


def test_user_facing_errors_live_in_errors_py():
    """Every exception class of ascendspeed/ and tools/ is defined in ascendspeed/errors.py and
    derives from AscendSpeedError, so an entry point's one `except AscendSpeedError` covers it."""
    from ascendspeed import errors

    strays = []
    for module, path in _modules().items():
        if module.startswith("megatron_ext") or module == "ascendspeed.errors":
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ClassDef) and (node.name.endswith("Error")
                                                   or node.name.endswith("Exception")):
                strays.append(f"{module}.{node.name}")
    assert strays == []
    classes = [value for value in vars(errors).values()
               if isinstance(value, type) and issubclass(value, BaseException)]
    assert len(classes) > 10 and all(issubclass(c, errors.AscendSpeedError) for c in classes)

"""The package layout's rules, read from the code's own imports (ast, nothing imported).

core imports neither Ray nor torch, nor any stage; model imports no Ray; runtime is below the stages;
train and serve never import each other; no import cycle among lits modules (imports inside functions
count: a cycle hidden in a function is still a cycle).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LITS = os.path.join(ROOT, "lits")
STAGES = ("prepare", "train", "serve", "evaluate")


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def resolve(module, node):
    """Absolute module names an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module.split(".")
        if not module_name_is_package(module):
            package = package[:-1]
        base = ".".join(package[: len(package) - node.level + 1])
        prefix = f"{base}.{node.module}" if node.module else base
    else:
        prefix = node.module
    # `from lits.core import storage` names the module lits.core.storage
    return [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]


def module_name_is_package(module):
    return os.path.exists(os.path.join(ROOT, *module.split("."), "__init__.py"))


def imports_of_tree():
    """{module: set of imported names (absolute, as written and their submodules)} over lits/."""
    graph = {}
    for folder, _, files in os.walk(LITS):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = module_name(path)
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                graph[module] = {
                    imported
                    for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for imported in resolve(module, node)
                }
    return graph


GRAPH = imports_of_tree()


def lits_imports(module):
    """The lits modules `module` imports (names that are not modules, like a class, are dropped)."""
    return {name for name in GRAPH[module] if name in GRAPH and name != module}


def package_of(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and module_name_is_package(module)) else ""


def top(name):
    return name.split(".")[0]


def test_every_module_lives_in_a_package():
    loose = [m for m in GRAPH if m.count(".") == 1 and not module_name_is_package(m)]
    assert loose == [], f"modules directly under lits/: {loose}; put each in its stage package"
    assert {package_of(m) for m in GRAPH if m != "lits"} == {"core", "runtime", "model", *STAGES}


@pytest.mark.parametrize("package, forbidden", [
    ("core", {"ray", "torch"}),
    ("model", {"ray"}),
])
def test_packages_stay_free_of_heavy_imports(package, forbidden):
    bad = sorted((m, n) for m in GRAPH if package_of(m) == package for n in GRAPH[m] if top(n) in forbidden)
    assert bad == [], f"lits.{package} must not import {sorted(forbidden)}: {bad}"


@pytest.mark.parametrize("package, allowed", [
    ("core", {"core"}),
    ("runtime", {"core", "runtime"}),
    ("model", {"core", "model"}),
    ("prepare", {"core", "runtime", "prepare"}),
    ("train", {"core", "runtime", "model", "evaluate", "train"}),
    ("serve", {"core", "runtime", "model", "serve"}),
    ("evaluate", {"core", "runtime", "evaluate"}),
])
def test_packages_import_only_what_is_below_them(package, allowed):
    bad = sorted(
        (m, n) for m in GRAPH if package_of(m) == package
        for n in lits_imports(m) if package_of(n) not in allowed and n != "lits"
    )
    assert bad == [], f"lits.{package} may import only {sorted(allowed)}: {bad}"


def test_no_import_cycle():
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for n in sorted(lits_imports(module)):
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


"""The tree is the architecture: the package's own imports, read with `ast`, keep to its layers.

Checked on every import statement, module-level or inside a function (a lazy import is still a
dependency): no import cycles between modules, no private name (`_x`) used across modules, and
dependencies that point one way, from the routes down to the data (see LAYERS)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "eyeray"

# Lower layers never import higher ones; units in one layer do not import each other.
# A unit is a subpackage (eyeray.data) or a top-level module (eyeray.storage).
LAYERS = [
    {"eyeray", "eyeray.tasks", "eyeray.storage", "eyeray.dicomweb", "eyeray.log", "eyeray.config_cli"},
    {"eyeray.preflight"},  # SettingError and the shared checks (storage) every route's preflight uses
    {"eyeray.data", "eyeray.cluster"},  # cluster: how every route connects to Ray
    {"eyeray.decision"},
    {"eyeray.evaluation", "eyeray.model"},
    {"eyeray.train", "eyeray.score", "eyeray.serve"},
    {"eyeray.sweep"},
    {"eyeray.demo"},
    {"eyeray.cli"},
]
SUBPACKAGES = ("data", "model", "decision", "evaluation", "train", "score", "serve", "sweep")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer(module: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit(module) in units)


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, name taken from it or None, line) for every eyeray import in `module`."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "eyeray"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "eyeray":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append(
                    (submodule, None, node.lineno) if submodule in MODULES else (node.module, alias.name, node.lineno)
                )
    return found


def module_aliases(module: str) -> dict[str, str]:
    """Local name -> eyeray module, for names bound to a module (`from eyeray.data import imaging`)."""
    out = {}
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eyeray"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    out[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return out


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in imports(m) if target != m} for m in MODULES}


def test_every_module_belongs_to_a_layer():
    units = set().union(*LAYERS)
    assert not [m for m in MODULES if unit(m) not in units], "add new top-level modules to LAYERS"
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) <= 3, f"eyeray/{name}/__init__.py: say in two lines what it owns"


def test_no_import_cycles():
    edges, seen, stack, cycles = graph(), set(), [], []

    def visit(m: str) -> None:
        if m in stack:
            cycles.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for target in sorted(edges[m]):
            if target in MODULES and not (target == unit(target) and m.startswith(f"{target}.")):
                visit(target)  # a package's __init__ re-exporting its children is not a cycle
        stack.pop()

    for m in sorted(MODULES):
        visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    leaks = []
    for m in MODULES:
        for target, name, line in imports(m):
            if name and name.startswith("_") and not name.startswith("__"):
                leaks.append(f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {target}.{name}")
        aliases = module_aliases(m)
        for node in ast.walk(ast.parse(MODULES[m].read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                leaks.append(
                    f"{MODULES[m].relative_to(PACKAGE.parent)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}"
                )
    assert not leaks, "private names used across modules:\n" + "\n".join(leaks)


def test_dependencies_point_down():
    wrong = []
    for m in MODULES:
        for target, _, line in imports(m):
            if unit(target) == unit(m) or target == "eyeray":
                continue
            if layer(target) >= layer(m):
                wrong.append(
                    f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {unit(m)} (layer {layer(m)}) "
                    f"imports {target} (layer {layer(target)})"
                )
    assert not wrong, "imports against the layers (lower layers never import higher ones):\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", ["eyeray.data.imaging", "eyeray.decision.decide", "eyeray.evaluation.metrics"])
def test_lower_layers_do_not_load_keras_or_ray(module):
    """The decode, the decision and the metrics stay importable without TensorFlow or Ray."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted({{'tensorflow', 'keras', 'ray'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} pulls in {out.strip()}"

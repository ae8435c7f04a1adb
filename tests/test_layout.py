"""The package layers: every import runs down (or sideways within a package), never up.

Read from the source with `ast`, functions' deferred imports included, so a cycle that
only a late import hides is caught too. docs/layout.md describes the layers.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Lowest first. A module may import its own layer's modules and any lower layer's.
LAYERS = [
    ["model.quiet", "model.defaults"],
    ["model.io"],
    ["model.cli"],
    ["model.text", "model.images"],
    ["model.data", "model.network"],
    ["model.decoding"],
    ["model.evaluation", "model.inference"],
    ["model.training"],
    ["model.train", "model.evaluate", "model.caption", "model.serving"],
    ["beam_jobs"],
]


def layer_of(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def project_modules() -> dict[str, pathlib.Path]:
    out = {}
    for top in ("model", "beam_jobs"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(p for p in parts if p != "__init__")
            out[name] = path
    return out


def imports_of(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("model", "beam_jobs", "demo", "tests")}


def test_every_module_has_a_layer():
    assert [m for m in project_modules() if layer_of(m) is None and m not in ("model",)] == []


def test_imports_run_down_the_layers_and_never_into_demo_or_tests():
    modules = project_modules()
    upward = []
    for name, path in modules.items():
        mine = layer_of(name)
        for imported in imports_of(path):
            assert imported.split(".")[0] not in ("demo", "tests"), (name, imported)
            if imported not in modules:  # a name imported from a module
                continue
            theirs = layer_of(imported)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{name} -> {imported}")
    assert upward == []


def test_no_import_cycles():
    modules = project_modules()
    graph = {n: {m for m in imports_of(p) if m in modules and m != n} for n, p in modules.items()}
    for package in [m for m in modules if (ROOT / m.replace(".", "/") / "__init__.py").exists()]:
        for deps in graph.values():
            deps.discard(package)  # `from model.io import storage` names the package too
    seen: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for dep in sorted(graph[node]):
            assert seen.get(dep) != 1, " -> ".join([*stack, node, dep])
            if dep not in seen:
                visit(dep, [*stack, node])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [])


def test_demo_code_is_not_installed():
    """What setup.py packages, as setuptools finds it: the two packages and nothing of
    demo/, tests/, benchmarks/ or scripts/."""
    import setuptools

    tree = ast.parse((ROOT / "setup.py").read_text())
    (call,) = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"
    ]
    (packages,) = [k.value for k in call.keywords if k.arg == "packages"]
    include = ast.literal_eval(packages.keywords[0].value)
    found = setuptools.find_packages(str(ROOT), include=include)
    assert {p.split(".")[0] for p in found} == {"model", "beam_jobs"}
    assert "model.training" in found and "beam_jobs" in found

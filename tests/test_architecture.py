"""The package's shape is a specification too: modules talk through public names only, and no two
modules import each other, directly or around a loop (function-level imports count)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, ast.Module]) -> dict[str, list[tuple[str, str | None, int]]]:
    """module -> [(imported pipeline module, imported name or None, line)]."""
    out: dict[str, list] = {}
    for name, tree in modules.items():
        is_package = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, node, is_package)
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        found.append((f"{target}.{alias.name}", None, node.lineno))
                    elif target in modules:
                        found.append((target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                found += [(a.name, None, node.lineno) for a in node.names if a.name in modules]
        out[name] = found
    return out


def _module_aliases(tree: ast.Module, modules) -> dict[str, str]:
    """Local names bound to pipeline modules (`from pipeline import cli`, `import pipeline.x as y`)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules and a.asname:
                    aliases[a.asname] = a.name
    return aliases


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offences = []
    for name, imports in _imports(modules).items():
        offences += [f"{name}:{line} imports {target}.{imported}" for target, imported, line in imports
                     if imported and imported.startswith("_") and not imported.startswith("__") and target != name]
        aliases = _module_aliases(modules[name], modules)
        for node in ast.walk(modules[name]):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offences.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not offences, "private names used across modules:\n" + "\n".join(offences)


def test_no_import_cycles_between_modules():
    graph = {m: {t for t, _, _ in imps if t != m and t != "pipeline"} for m, imps in _imports(_modules()).items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "modules importing each other (directly or around a loop): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_stages_follow_the_data_flow():
    """A stage package never imports a later stage (the CLI and the shells at the top may import any)."""
    order = ["data", "planning", "preprocessing", "training", "inference", "evaluation"]
    modules = _modules()
    offences = []
    for name, imports in _imports(modules).items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in order:
            continue
        for target, _, line in imports:
            tparts = target.split(".")
            if len(tparts) >= 2 and tparts[1] in order and order.index(tparts[1]) > order.index(parts[1]):
                offences.append(f"{name}:{line} imports the later stage {target}")
    assert not offences, "\n".join(offences)


def test_no_stage_imports_the_interop_package():
    """`interop` (other tools' formats) sits beside the flow: it may use every stage, no stage uses it."""
    stages = ("data", "planning", "preprocessing", "training", "inference", "evaluation")
    offences = [f"{name}:{line} imports {target}" for name, imports in _imports(_modules()).items()
                if name.split(".")[1:2] and name.split(".")[1] in stages
                for target, _, line in imports if target.startswith("pipeline.interop")]
    assert not offences, "\n".join(offences)


def test_the_stage_packages_mirror_the_flow_diagram():
    for package in ("data", "planning", "preprocessing", "training", "inference", "evaluation"):
        assert (PACKAGE / package / "__init__.py").is_file(), package
    packages = sorted(d.name for d in PACKAGE.iterdir() if (d / "__init__.py").is_file())
    assert packages == ["data", "evaluation", "inference", "interop", "planning", "preprocessing", "training"], packages
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "allocator", "cli", "config_docs", "console", "errors", "parallel", "plotting", "precision", "run",
                   "stages", "storage", "workdir"], top

"""The package's layers, read from its imports: each module imports only from its own
layer or the ones below, and no two modules import each other, even for types only.

Layers, top to bottom (docs/development.md): the front door (cli, api, __main__), the
supervisor (the master), the worker, http (the wire), observe (metrics, /status), system
(the operating system's contracts), and the base (config, configfile, logs, errors, app,
the package itself for its version)."""

from __future__ import annotations

import ast
from pathlib import Path

import hello_cluster

PACKAGE = Path(hello_cluster.__file__).parent
LAYERS = ["base", "system", "observe", "http", "worker", "supervisor", "front"]
FRONT = {"cli", "api", "__main__"}
BASE = {"config", "configfile", "logs", "errors", "app", "__init__"}
# The one import that goes up, and why: `hello_cluster.run` is imported on first use
# (PEP 562), so `import hello_cluster` never loads the CLI; nothing runs it at import time.
LAZY_FRONT_DOOR = {("hello_cluster", "hello_cluster.api")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "base"
    if parts[0] in FRONT:
        return "front"
    if parts[0] in BASE:
        return "base"
    assert parts[0] in LAYERS, f"{module}: in no layer; add it to tests/test_layers.py"
    return parts[0]


def imports(path: Path) -> set[str]:
    """Every hello_cluster module `path` imports, at any depth of the file."""
    found: set[str] = set()
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hello_cluster")}
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("hello_cluster"):
            for alias in node.names:  # `from hello_cluster.http import tls` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def graph() -> dict[str, set[str]]:
    edges = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
    return {m: {d for d in deps if d != m and (m, d) not in LAZY_FRONT_DOOR}
            for m, deps in edges.items()}


def test_every_import_goes_down_or_sideways() -> None:
    wrong = []
    for module, deps in graph().items():
        for dep in deps:
            if LAYERS.index(layer(dep)) > LAYERS.index(layer(module)):
                wrong.append(f"{module} ({layer(module)}) imports {dep} ({layer(dep)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_type_only_and_function_level_imports(tmp_path: Path) -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
              "    from hello_cluster.supervisor.master import Master\n"
              "def f():\n    from hello_cluster.worker import process\n")
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert imports(probe) == {"hello_cluster.supervisor.master", "hello_cluster.worker.process"}


def test_the_readme_is_the_front_door_and_its_links_resolve() -> None:
    """README at most 300 lines (issue 21); every relative link in it and in docs/ points
    at a file that exists, and every #anchor at a heading of that file."""
    import re

    root = PACKAGE.parent.parent
    readme = root / "README.md"
    assert len(readme.read_text().splitlines()) <= 300

    def anchors(path: Path) -> set[str]:
        found, in_code = set(), False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
            elif not in_code and (m := re.match(r"#{1,6} (.*)", line)):
                found.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
        return found

    broken = []
    for page in [readme, *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)

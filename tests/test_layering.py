"""The package's layering, checked by reading the source (an AST walk; nothing is imported).

Every module of ``moe_course`` sits on one level of :data:`LEVELS` (the same order as the package
docstring). An import, at module level or inside a function, may point to the same level or a lower
one, never up; the import graph has no cycle; and nothing in the package imports test tooling.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import moe_course

PACKAGE = Path(moe_course.__file__).parent

# Lowest first. A module is placed by its longest matching prefix ("compress.recipes" before "compress").
LEVELS: list[tuple[str, ...]] = [
    ("", "device", "progress", "_validate", "losses", "dispatch", "layers", "data"),   # core
    ("models",),
    ("train", "calib"),
    ("metrics",),
    ("compress", "factorized"),
    ("compress.recipes", "zoo", "viz", "widgets", "serving", "hf", "hf_zoo"),
    ("course_table", "grading", "cli", "doctor", "exercises"),
]
TEST_TOOLING = ("pytest", "hypothesis", "nbval", "tests", "unittest", "_pytest")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _level(module: str) -> int:
    best, level = -1, None
    for i, names in enumerate(LEVELS):
        for name in names:
            if (module == name or module.startswith(name + ".") or name == "") and len(name) > best:
                best, level = len(name), i
    return level


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Package-relative names of the modules ``node`` imports (a name imported from a package is
    the submodule when one exists, else the package itself)."""
    if node.level:
        base = module.split(".") if module else []
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    elif node.module == "moe_course" or (node.module or "").startswith("moe_course."):
        target = node.module[len("moe_course."):] if node.module != "moe_course" else ""
    else:
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}" if target else alias.name
        out.append(sub if sub in MODULES else target)
    return out


def imports(module: str) -> dict[str, int]:
    """``{imported module: line}`` for every import of ``module`` inside the package, including a
    module named by a string constant (``importlib.import_module("moe_course.zoo")``, a string
    registry); plus the root of every other import as ``"!root"``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for target in _resolve(module, path.name == "__init__.py", node):
                found.setdefault(target, node.lineno)
            if not node.level and node.module:
                found.setdefault("!" + node.module.split(".")[0], node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "moe_course" or alias.name.startswith("moe_course."):
                    found.setdefault(alias.name[len("moe_course."):] if "." in alias.name else "", node.lineno)
                found.setdefault("!" + alias.name.split(".")[0], node.lineno)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("moe_course.")
              and node.value[len("moe_course."):] in MODULES):
            # a module named in a string (importlib.import_module("moe_course.zoo"), a string registry)
            found.setdefault(node.value[len("moe_course."):], node.lineno)
    found.pop(module, None)
    return found


GRAPH = {m: {t: line for t, line in imports(m).items() if not t.startswith("!")} for m in MODULES}


def test_every_module_has_a_level():
    missing = [m for m in MODULES if _level(m) is None]
    assert not missing, f"place these modules on a level of LEVELS (and in the package docstring): {missing}"


def test_no_upward_import():
    upward = [f"{m} (level {_level(m)}) imports {t} (level {_level(t)}) at line {line}"
              for m, targets in GRAPH.items() for t, line in targets.items() if _level(t) > _level(m)]
    assert not upward, "imports must point down:\n" + "\n".join(upward)


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in GRAPH.get(todo.pop(), ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_no_import_cycle():
    reach = {m: _reachable(m) for m in GRAPH}
    cycles = sorted({" <-> ".join(sorted({m} | {t for t in reach[m] if m in reach[t]})) for m in GRAPH if m in reach[m]})
    assert not cycles, "import cycles (each line: modules that import each other, directly or not):\n" + "\n".join(cycles)


def test_package_imports_no_test_tooling():
    bad = [f"{m} imports {t[1:]} at line {line}" for m in MODULES for t, line in imports(m).items()
           if t.startswith("!") and t[1:] in TEST_TOOLING]
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    # ``_validate`` is the package's own checks module: private to the package, shared inside it
    bad = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("moe_course")):
                bad += [f"{module} imports {alias.name} from {node.module or '.'} at line {node.lineno}"
                        for alias in node.names
                        if alias.name.startswith("_") and alias.name not in ("_validate", "__version__")]
    assert not bad, "private helpers belong to their module; make them public or move them:\n" + "\n".join(bad)


def test_package_docstring_lists_the_levels():
    doc = moe_course.__doc__
    for names in LEVELS:
        for name in names:
            if name and "." not in name:
                assert f"``{name}``" in doc, f"the package docstring's layering should name ``{name}``"


def test_every_module_docstring_names_its_chapter():
    missing = [m for m, path in MODULES.items()
               if not re.search(r"\b[Cc]hapters? \d+", ast.get_docstring(ast.parse(path.read_text())) or "")]
    assert not missing, f"say which chapter each module belongs to, in its docstring: {missing}"


def test_the_walk_sees_lazy_and_relative_imports():
    # guards the checker itself: a lazy import inside a function and a relative import are found
    assert "layers" in GRAPH["metrics"]
    assert "layers" in GRAPH["compress.pruning"]
    assert "zoo" in GRAPH["cli"] or "course_table" in GRAPH["cli"] or any("grading" in t for t in GRAPH["cli"])

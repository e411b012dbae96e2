"""The layering the package promises, checked on its source (see README, Architecture)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "reslora_diffusers"
RES_TYPES = {"none", "is", "bs", "ms"}


def _modules(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imported(path: Path, node: ast.AST) -> list[str]:
    """Absolute module names an import statement reads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            return [node.module or ""]
        package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
        if path.name == "__init__.py":
            package = path.relative_to(PACKAGE.parent).parts[:-1]
        base = package[: len(package) - node.level + 1]
        return [".".join([*base, *(node.module.split(".") if node.module else [])])]
    return []


def test_core_imports_nothing_of_the_package_outside_core_and_utils():
    bad = []
    for path, tree in _modules(PACKAGE / "core"):
        for node in ast.walk(tree):  # module level and inside functions alike
            for name in _imported(path, node):
                inside = name.startswith(("reslora_diffusers.core", "reslora_diffusers.utils"))
                if name.startswith("reslora_diffusers") and not inside:
                    bad.append(f"{path.name}:{node.lineno} imports {name}")
    assert not bad


def test_no_res_type_name_is_compared_outside_the_shortcut_types():
    bad = []
    for path, tree in _modules(PACKAGE):
        if "shortcuts" in path.parts:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(v, ast.Constant) and v.value in RES_TYPES for v in values):
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad


def test_no_module_reads_another_objects_private_attributes():
    bad = []
    for path, tree in _modules(PACKAGE):
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad

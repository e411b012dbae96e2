"""The layering the package promises, checked on its source (see README, Architecture)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "reslora_diffusers"
RES_TYPES = {"none", "is", "bs", "ms"}
#: the package's floors, lowest first (README, Architecture): a module imports only modules of its
#: own floor or of the floors below it, at module level and inside functions alike
FLOORS = (
    ("utils",),
    ("core",),
    ("merge",),
    ("integrations",),
    ("data",),
    ("eval",),
    ("objectives",),
    ("frontends",),
    ("api",),
    ("export",),
    ("training",),
    ("cli", "__init__"),
)


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


def _floor(module: str) -> int:
    """The floor of a module path ``core/chain.py`` or of a dotted name ``reslora_diffusers.core.chain``."""
    parts = module.removeprefix("reslora_diffusers.").replace("/", ".").removesuffix(".py").split(".")
    top = parts[0] if parts != ["reslora_diffusers"] else "__init__"
    return next(i for i, names in enumerate(FLOORS) if top in names)


def test_every_module_imports_only_its_own_floor_and_the_floors_below():
    bad = []
    for path, tree in _modules(PACKAGE):
        own = _floor(path.relative_to(PACKAGE).as_posix())
        for node in ast.walk(tree):
            for name in _imported(path, node):
                if name.split(".")[0] == "reslora_diffusers" and _floor(name) > own:
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {name} (a higher floor)")
    assert not bad


def test_every_package_and_module_has_a_floor():
    """A new package is placed in ``FLOORS`` (and the README's Architecture) on purpose."""
    tops = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    tops |= {p.stem for p in PACKAGE.glob("*.py")}
    assert tops == {name for floor in FLOORS for name in floor}


#: what only a diffusion family's own file names: its components beyond the first text encoder,
#: its LoRA-scale keyword, its name (kohya-ss key tables, keyed by family, are export/kohya.py's)
FAMILY_NAMES = {
    "attention_kwargs",
    "qwen_image",
    "z_image",
    "text_encoder_2",
    "text_encoder_3",
    "cross_attention_kwargs",
    "joint_attention_kwargs",
    "stable_diffusion",
    "stable_diffusion_xl",
    "stable_diffusion_3",
    "flux",
    "flux2",
    "wan",
    "transformer_2",
}
FAMILY_FILES = {
    "frontends/qwen_image.py",
    "frontends/z_image.py",
    "frontends/sd.py",
    "frontends/sdxl.py",
    "frontends/sd3.py",
    "frontends/flux.py",
    "export/kohya.py",
    "frontends/flux2.py",
    "frontends/wan.py",
    "export/comfyui.py",
}


def test_a_diffusion_familys_names_appear_in_its_own_file_alone():
    """The script, the demo and every module but the family files ask the families (components,
    text encoders, objective, LoRA-scale keyword, formats); the random-pipeline presets of
    ``data/`` build the published architectures and are not asked."""
    files = [(p.relative_to(PACKAGE).as_posix(), t) for p, t in _modules(PACKAGE) if "data" not in p.parts]
    for script in (PACKAGE.parent / "train_text_to_image.py", PACKAGE.parent / "app" / "app.py"):
        files.append((script.name, ast.parse(script.read_text())))
    bad = [
        f"{name}:{node.lineno}: {node.value!r}"
        for name, tree in files
        if name not in FAMILY_FILES
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in FAMILY_NAMES
    ]
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

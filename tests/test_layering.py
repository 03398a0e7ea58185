"""The layering of docs/architecture.md, checked on the source: every import of every module of a floor (module
level and inside functions, relative ones resolved), read with ast, against what that floor may import; and the
runtime imported in a fresh interpreter, to see what it pulls in."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]

# package -> (the only lmc packages it may import, or None for any; what it may never import)
FLOORS = {
    "lmc.format": (("lmc.errors", "lmc.format"), ()),
    "lmc.kernels": (None, ("lmc.runtime", "lmc.compiler", "lmc.calib", "lmc.api", "lmc.cli")),
    "lmc.calib": (None, ("lmc.runtime", "lmc.compiler", "lmc.kernels", "lmc.api", "lmc.cli")),
    "lmc.runtime": (None, ("lmc.compiler", "lmc.calib", "lmc.api", "lmc.cli", "transformers", "datasets")),
    "lmc.compiler": (None, ("lmc.runtime.engine", "lmc.api", "lmc.cli")),
}


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imported_names(path: Path, package: str) -> set[str]:
    """Every module (or `module.name`, for `from module import name`) that the file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names.update(module if alias.name == "*" else f"{module}.{alias.name}" for alias in node.names)
    return names


def violations(package: str) -> list[str]:
    allowed, forbidden = FLOORS[package]
    found = []
    for path in sorted((ROOT / PACKAGE_DIRS[package]).rglob("*.py")):
        for name in sorted(imported_names(path, package)):
            if any(under(name, f) for f in forbidden) or (
                    allowed is not None and under(name, "lmc") and not any(under(name, a) for a in allowed)):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_every_package_but_lmc_has_a_floor():
    assert set(PACKAGE_DIRS) - {"lmc"} == set(FLOORS)


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_floor_imports(package):
    assert violations(package) == []


def test_imports_are_found_inside_functions_and_relative(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("import torch\nfrom lmc.errors import LmcError\n"
                    "def f():\n    import transformers\n    from . import cli\n    from .. import api\n"
                    "    from lmc.format import archs as a, int4\n")
    assert imported_names(path, "lmc.runtime") == {"torch", "lmc.errors.LmcError", "transformers", "lmc.runtime.cli",
                                                   "lmc.api", "lmc.format.archs", "lmc.format.int4"}


def test_runtime_and_format_load_without_transformers_datasets_or_compiler():
    """Importing every runtime and format module pulls in none of the compiler's dependencies: a prebuilt
    workspace runs with torch, triton, safetensors, numpy, tokenizers and jinja2."""
    modules = [f"{package}.{path.stem}" for package in ("lmc.runtime", "lmc.format")
               for path in sorted((ROOT / PACKAGE_DIRS[package]).glob("*.py")) if path.stem != "__init__"]
    assert "lmc.runtime.engine" in modules and "lmc.runtime.model" in modules
    code = (f"import sys, {', '.join(modules)}; "
            "print([m for m in ('transformers', 'datasets', 'lmc.compiler', 'lmc.calib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_architecture_doc_lists_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    folders = [*PACKAGE_DIRS.values(), "bench"]
    missing = [str(path.relative_to(ROOT)) for folder in folders for path in sorted((ROOT / folder).glob("*.py"))
               if f"`{path.relative_to(ROOT).as_posix()}`" not in doc]
    assert missing == []

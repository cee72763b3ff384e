"""The floors of docs/architecture.md hold: every import in bip_fast/ points down, function-local
imports of the package's own modules are only the listed exceptions, and no module is too long."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "bip_fast"
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 420  # "about 400"
# (importing module, imported module): function-local on purpose, each with a comment at the import
LOCAL_IMPORTS_ALLOWED = {
    ("bip_fast.ops._dispatch", "bip_fast.ops.triton"),
    ("bip_fast.ops._impl", "bip_fast.ops.triton"),
}


def read_floors(text: str) -> dict:
    """{package: floor} from the table rows ``| N | `pkg`, `pkg` | ... |`` of the document."""
    floors = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if m:
            for pkg in re.findall(r"`([\w.]+)`", m.group(2)):
                floors[pkg] = int(m.group(1))
    return floors


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str, floors: dict) -> str:
    """The longest package of the table that ``module`` is or lies in."""
    best = None
    for pkg in floors:
        if module == pkg or module.startswith(pkg + "."):
            if best is None or len(pkg) > len(best):
                best = pkg
    if best is None:
        raise AssertionError(f"{module} belongs to no floor of docs/architecture.md")
    return best


def imports_of(path: Path, mod: str = ""):
    """(imported bip_fast module, line, function-local?) for every import in ``path`` (the module
    ``mod``, by default the one at that path)."""
    mod = mod or module_name(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    local_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    local_nodes.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bip_fast":
                    yield alias.name, node.lineno, id(node) in local_nodes
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "bip_fast":
                continue
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{target}.{alias.name}"
                is_module = (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (PKG.parent / Path(*sub.split("."))).is_dir()
                yield (sub if is_module else target), node.lineno, id(node) in local_nodes


def package_modules():
    return sorted(p for p in PKG.rglob("*.py"))


def test_document_lists_every_package():
    floors = read_floors(DOC.read_text())
    assert floors.get("bip_fast._ext") == 0 and floors.get("bip_fast.engine", -1) > floors.get("bip_fast.pruning", 99)
    for path in package_modules():
        package_of(module_name(path), floors)  # raises for a module outside every floor


def test_every_import_points_down():
    floors = read_floors(DOC.read_text())
    bad = []
    for path in package_modules():
        mod = module_name(path)
        own = package_of(mod, floors)
        for target, line, _ in imports_of(path):
            other = package_of(target, floors)
            if other != own and floors[other] >= floors[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mod} (floor {floors[own]}) imports {target} "
                           f"(floor {floors[other]})")
    assert not bad, "imports that do not point down:\n" + "\n".join(bad)


def test_no_function_local_imports_of_own_modules():
    bad = []
    for path in package_modules():
        mod = module_name(path)
        for target, line, local in imports_of(path):
            if local and (mod, target) not in LOCAL_IMPORTS_ALLOWED:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not bad, "function-local imports of bip_fast modules:\n" + "\n".join(bad)


def test_allowed_local_imports_carry_a_comment():
    for mod, target in LOCAL_IMPORTS_ALLOWED:
        path = PKG.parent / Path(*mod.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        lines = path.read_text().splitlines()
        hits = [i for i, (t, line, local) in enumerate(imports_of(path)) if t == target and local]
        assert hits, f"{mod} no longer imports {target} locally: drop it from LOCAL_IMPORTS_ALLOWED"
        for t, line, local in imports_of(path):
            if t == target and local:
                near = " ".join(lines[max(0, line - 3):line])
                assert "#" in near, f"{path.relative_to(ROOT)}:{line}: say why this import is local"


def test_checker_sees_a_bad_import(tmp_path):
    """The checker itself: an upward and a function-local import of a ground-floor module are found."""
    fake = tmp_path / "probe.py"
    fake.write_text("from ..engine import loop\n\ndef f():\n    from ..pruning import BiP\n")
    got = list(imports_of(fake, "bip_fast.data.probe"))
    assert ("bip_fast.engine.loop", 1, False) in got and ("bip_fast.pruning", 4, True) in got


@pytest.mark.parametrize("folder", ["bip_fast", "benchmarks", "scripts", "tests"])
def test_modules_are_short(folder):
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted((ROOT / folder).rglob("*.py"))
            if "results" not in p.parts and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility):\n" + "\n".join(long)

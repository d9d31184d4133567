"""Dependencies point down: every module of src/speedlm imports only from its own layer or from
layers below it. Read from the source with `ast` (nothing is imported), so an import inside a
function counts as much as one at the top, and a lazy import cannot hide a cycle; so does a
module named to `importlib.import_module`."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "speedlm"

# Bottom to top. A layer is a subpackage or a top-level module of speedlm ("speedlm" is the
# package's own __init__: __version__). The README's architecture section states this order.
LAYERS = [
    "errors",
    "speedlm",
    "registry",
    "schema",
    "device",
    "progress",
    "separators",
    "data",
    "tasks",
    "ops",
    "cache",
    "layers",
    "models",
    "generate",
    "checkpoint",
    "hf",
    "train",
    "bench",
    "compare",
    "distill",
    "commands",
    "harness",
    "cli",
    "__main__",
]
RANK = {name: i for i, name in enumerate(LAYERS)}

# Imports by name through importlib that are part of the design, with the reason.
DYNAMIC_ALLOWED = {
    # the registries (bottom) fill themselves on first lookup from the built-in parts' module,
    # so that a layer can build a part by name; the parts register themselves from above
    ("registry.py", "speedlm.models.registry"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """'speedlm.layers.mamba' -> 'layers'; 'speedlm' -> 'speedlm'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "speedlm"


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "..." assignments (an import_module argument may name one)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def imported_modules(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, dynamic) for every speedlm import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    constants = _string_constants(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "speedlm":  # `from speedlm import data` imports the data layer
                found += [(node.lineno, f"speedlm.{a.name}" if is_submodule(a.name) else "speedlm", False)
                          for a in node.names]
            else:
                found.append((node.lineno, module, False))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            arg = node.args[0] if node.args else None
            name = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", None))
            if isinstance(name, str):
                found.append((node.lineno, name, True))
    return [(line, m, dyn) for line, m, dyn in found if m == "speedlm" or m.startswith("speedlm.")]


def is_submodule(name: str) -> bool:
    return (SRC / name).is_dir() or (SRC / f"{name}.py").is_file()


def violations() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        importer = layer_of(module_name(path))
        for line, module, dynamic in imported_modules(path):
            imported = layer_of(module)
            unknown = [x for x in (importer, imported) if x not in RANK]
            if unknown:
                found.append(f"{rel}:{line}: layer {unknown[0]!r} is not in LAYERS (tests/test_layering.py); place it")
            elif RANK[imported] > RANK[importer] and not (dynamic and (rel, module) in DYNAMIC_ALLOWED):
                found.append(f"{rel}:{line}: {importer} -> {imported} ({module})")
    return found


def test_every_import_points_down():
    found = violations()
    assert not found, (
        f"{len(found)} import(s) point up the layers (bottom to top: {', '.join(LAYERS)}):\n  " + "\n  ".join(found)
    )


def test_every_layer_exists_and_the_walk_sees_lazy_imports():
    assert all(is_submodule(name) or name == "speedlm" for name in LAYERS), [n for n in LAYERS if not is_submodule(n)]
    # the walk reaches imports inside functions: data's loader is imported lazily by checkpoint
    lines = imported_modules(SRC / "checkpoint" / "pretrained.py")
    assert any(m == "speedlm.data" for _, m, _ in lines), lines


def test_a_violation_is_reported_with_file_line_and_layers(tmp_path, monkeypatch):
    fake = tmp_path / "speedlm"
    (fake / "ops").mkdir(parents=True)
    (fake / "models").mkdir()
    (fake / "ops" / "bad.py").write_text("import torch\n\n\ndef f():\n    from speedlm.models import build_model\n")
    (fake / "models" / "good.py").write_text("from ..ops import bad\nfrom speedlm import errors\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert violations() == ["ops/bad.py:5: ops -> models (speedlm.models)"]

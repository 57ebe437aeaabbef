"""The architecture stays layered: no module imports from a layer above its own.

linalg → models/data → layers → adapters | compress | optim → evaluation/analysis/serve/pretrain
→ cli (DESIGN.md, refined: the structured layer types sit below compress so that compression
and training share them), with
the small utilities (errors, registry, modules, options, fileio, progress) below all of
them. Imports inside functions count too: a lazy import is still a dependency. The package
root (``import rankwise``, for ``rankwise.load_model`` and ``__version__``) sits above every
layer by design and may be used anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rankwise"

LAYERS = {
    "errors": 0,
    "registry": 1, "modules": 1, "options": 1, "fileio": 1, "progress": 1,
    "linalg": 2,
    "models": 3, "data": 3,
    "layers": 4,
    "adapters": 5, "compress": 5, "optim": 5,
    "evaluation": 6, "analysis": 6, "serve": 6, "pretrain": 6,
    "cli": 7, "__main__": 7,
}  # fmt: skip
SIBLINGS_APART = {("adapters", "compress"), ("compress", "adapters")}


def component(module: str) -> str | None:
    """``rankwise.compress.api`` -> ``compress``; the bare package root -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "rankwise" and len(parts) > 1 else None


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "rankwise":  # from rankwise import models
                found += [(node.lineno, f"rankwise.{alias.name}") for alias in node.names]
    return found


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_component_has_a_layer():
    names = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in sources()} - {"__init__"}
    assert names <= set(LAYERS), f"give {sorted(names - set(LAYERS))} a layer in LAYERS"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_upward_import(path):
    own = path.relative_to(SRC).parts[0].removesuffix(".py")
    if own == "__init__":
        return  # the package root is the facade above every layer
    problems = []
    for line, module in imports(path):
        other = component(module)
        if other is None or other == own or other not in LAYERS:
            continue  # the root, this component, or rankwise.__version__-like attributes
        if LAYERS[other] > LAYERS[own] or (own, other) in SIBLINGS_APART:
            problems.append(f"line {line}: {own} (layer {LAYERS[own]}) imports {module} (layer {LAYERS[other]})")
    assert not problems, "\n".join(problems)

"""The layout's import rules (docs/ARCHITECTURE.md), checked on the source with ast: data flows
one way, the server never imports training or evaluation code, the model library imports
nothing from the jobs that use it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> prefixes its modules must not import
FORBIDDEN = {
    "engine/model": ("engine.training", "engine.evaluation", "engine.tokens", "engine.catalog", "indexer", "server"),
    "engine/catalog": ("engine.model", "engine.training", "engine.evaluation", "engine.tokens", "indexer", "server"),
    "engine/tokens": ("engine.training", "engine.evaluation", "indexer", "server"),
    "engine/training": ("engine.evaluation", "indexer", "server"),
    "engine/evaluation": ("indexer", "server"),
    "engine/retrieval": ("engine.training", "engine.evaluation", "engine.tokens", "indexer", "server"),
    "indexer": ("engine.training", "engine.evaluation", "server"),
    "server": ("engine.training", "engine.evaluation", "engine.catalog", "engine.tokens"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_layout(package):
    files = [p for p in (REPO / package).rglob("*.py") if "gen" not in p.relative_to(REPO).parts]
    assert files, f"no modules under {package}"
    bad = [f"{p.relative_to(REPO)} imports {name}" for p in files for name in sorted(_imports(p))
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])]
    assert not bad, "\n".join(bad)

"""House limits on server/ and indexer/: no file over 400 lines, no function over 60 lines
(docstring included; generated gRPC stubs excepted). Reads the source with ``ast``."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "indexer")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py") if "gen" not in p.parts)


def over_limits() -> list[str]:
    """``path: what`` for every file or function over its limit."""
    found = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        name = path.relative_to(REPO)
        if lines > MAX_FILE_LINES:
            found.append(f"{name}: {lines} lines (limit {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}: {length} lines (limit {MAX_FUNCTION_LINES})")
    return found


def test_server_and_indexer_stay_within_the_size_limits():
    assert _sources(), "no sources found"
    assert over_limits() == []

"""The lexical (BM25) index of an index version: built beside the faiss shards, listed and
checksummed in the manifest like every other file, opened with the version (so it is
hot-swapped with it).

Layout: ``VERSION/lexical/`` holds the bm25s files (``engine.retrieval.lexical``); document i
is internal id i (the row of the exact-vector file), its text ``product_text(title,
attributes)`` of the record. Manifest: ``"lexical": {"dir", "engine", "k1", "b", "stopwords",
"documents", "tokens"}`` and every file under ``files``. A version written before the lexical
index existed has no ``lexical`` key: it opens, and lexical / hybrid search on it is refused
with ``LexicalUnavailableError``. Source: our choice.
"""
from __future__ import annotations

from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Sequence

from engine.retrieval.lexical import B, K1, STOPWORDS, LexicalIndex, product_text
from indexer.errors import IndexIntegrityError, SearchArgumentError

LEXICAL_DIR = "lexical"


class LexicalUnavailableError(SearchArgumentError):
    """The index version has no lexical index (built before it existed, or from records without
    text). Mapped to FAILED_PRECONDITION."""


def write_lexical(out_dir: Path, records: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[str]]:
    """Build the BM25 index of ``records`` (row i = internal id i) into ``out_dir/lexical``.

    Returns ``(manifest section, file names relative to out_dir)``, or ``(None, [])`` when no
    record has a word to index (e.g. vectors without titles): the version then serves dense
    retrieval only, and lexical / hybrid requests get FAILED_PRECONDITION, as on a version
    built before the lexical index existed (our choice).
    """
    texts = [product_text(r.get("title"), r.get("attributes")) for r in records]
    try:
        index = LexicalIndex.build(texts)
    except ValueError:  # LexicalIndex.build: no document has a token
        return None, []
    names = index.save(out_dir / LEXICAL_DIR)
    section = {"dir": LEXICAL_DIR, "engine": f"bm25s {package_version('bm25s')}", "k1": K1, "b": B,
               "stopwords": STOPWORDS, "documents": index.n_docs,
               "text": "title, then attribute values (keys sorted); engine/retrieval/lexical.py"}
    return section, [f"{LEXICAL_DIR}/{name}" for name in names]


def open_lexical(version_dir: Path, manifest: dict[str, Any]) -> LexicalIndex | None:
    """The version's lexical index (memory-mapped), or None when the manifest has none.
    Raises IndexIntegrityError when it cannot be read or its document count is not the
    number of indexed items."""
    section = manifest.get("lexical")
    if section is None:
        return None
    folder = Path(version_dir) / str(section.get("dir", LEXICAL_DIR))
    try:
        index = LexicalIndex.load(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise IndexIntegrityError(f"{folder}: unreadable lexical index ({exc!r})") from exc
    if index.n_docs != int(manifest["counts"]["indexed"]):
        raise IndexIntegrityError(f"{folder}: {index.n_docs} lexical documents, manifest says "
                                  f"{manifest['counts']['indexed']} indexed items")
    return index

"""Errors of the indexer and of opening / searching an index version. Source: our choice.

``IndexVersionError`` and its subclasses mean "this index version (or ROOT) cannot be
used"; ``SearchArgumentError`` (a ``ValueError``) means "this search request is invalid"
(the server answers INVALID_ARGUMENT for it).
"""
from __future__ import annotations


class IndexVersionError(RuntimeError):
    """An index version cannot be opened: missing files, bad manifest, unknown format."""


class NoCurrentVersionError(IndexVersionError):
    """``ROOT/CURRENT`` is missing or names a version folder that does not exist."""


class IndexIntegrityError(IndexVersionError):
    """An index version does not match its manifest (a file's size, sha256 or schema), or
    the manifest lacks a key or holds a bad value."""


class SearchArgumentError(ValueError):
    """A search request is invalid (query shape / dtype, top_k, nprobe, filter)."""


class BuildError(RuntimeError):
    """An index build cannot proceed (bad factory string, no products, count mismatch)."""

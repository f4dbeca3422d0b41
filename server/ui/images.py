"""Catalogue photos for the search page, served from one folder and nothing outside it.

A hit's ``image`` metadata field holds the photo path the indexer recorded. The page gets a
URL ``/images/<path relative to the image folder>`` for it; the route resolves the request
path (symlinks and ``..`` included) and answers 404 unless the result is a regular file
inside the image folder. Source: our choice (issue 17).
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import quote


def image_folder(catalog: str | Path | None) -> Path | None:
    """The folder photos are served from: ``CATALOG/images`` when it exists (the fashion
    layout), else the catalogue folder (the folder of a catalogue file such as
    ``products.jsonl``); None when no catalogue was given (no photos are served).

    Raises:
        FileNotFoundError: ``catalog`` does not exist.
    """
    if catalog is None:
        return None
    path = Path(catalog).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"catalogue not found: {catalog}")
    folder = path if path.is_dir() else path.parent
    return folder / "images" if (folder / "images").is_dir() else folder


def contained_file(folder: Path | None, relative: str) -> Path | None:
    """``folder / relative`` resolved, when it is a regular file inside ``folder``; else None
    (absolute paths, ``..`` escapes and symlinks pointing out all give None)."""
    if folder is None or not relative or "\x00" in relative:
        return None
    candidate = (folder / relative).resolve()
    if not candidate.is_relative_to(folder) or not candidate.is_file():
        return None
    return candidate


def image_url(folder: Path | None, recorded: str | None) -> str | None:
    """URL of a recorded photo path under ``/images/``, or None when it lies outside
    ``folder`` (or no folder / no photo)."""
    if folder is None or not recorded:
        return None
    path = Path(recorded)
    path = (path if path.is_absolute() else folder / path).resolve()
    if not path.is_relative_to(folder):
        return None
    return "/images/" + quote(path.relative_to(folder).as_posix())

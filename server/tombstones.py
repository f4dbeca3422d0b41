"""Live deletes: product ids hidden from the served index version, persisted beside the versions.

File ``ROOT/tombstones.json`` (our choice; written to a temporary name, fsynced, renamed)::

    {"format": "ecsearch-tombstones-v1",
     "deleted": [{"product_id": "15970", "version": "<version served when deleted>",
                  "deleted_utc": "2026-12-05T23:10:00+00:00"}, ...]}

Each delete is keyed to the index version it was made on. When a version is served
(``apply``), deletes of products that version no longer holds are done (the build included
them) and dropped from the file; the others stay and are hidden in the new version too
(``IndexVersion.hidden``, checked inside ``IndexVersion.search``, so exact k still holds).
A restart reads the file back, so a delete holds until a version includes it.
Thread-safe: one lock around the set and the file. Source: our choice.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

TOMBSTONES_FILE = "tombstones.json"
FORMAT = "ecsearch-tombstones-v1"


class TombstoneError(RuntimeError):
    """``ROOT/tombstones.json`` cannot be read or written (the message names the file and why)."""


class TombstoneStore:
    """The live deletes of one index root. ``path``: the JSON file (created on first delete)."""

    def __init__(self, root: Path):
        """Read ``ROOT/tombstones.json`` if present. Raises TombstoneError when it is unreadable
        or of another format (a server must not silently show deleted products again)."""
        self.path = Path(root) / TOMBSTONES_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = self._read()
        self._indexes: weakref.WeakSet = weakref.WeakSet()  # versions ``apply`` prepared (served or about to be)

    def _hide(self) -> None:
        """Set every prepared version's hidden set (lock held): a delete made while a swap is
        under way reaches the incoming version too."""
        hidden = frozenset(self._entries)
        for index in list(self._indexes):
            index.hidden = hidden

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TombstoneError(f"{self.path}: unreadable live deletes ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("deleted"), list):
            raise TombstoneError(f"{self.path}: not an {FORMAT} file")
        entries = {}
        for entry in data["deleted"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("product_id"), str):
                raise TombstoneError(f"{self.path}: bad entry {entry!r}")
            entries[entry["product_id"]] = entry
        return entries

    def _write(self) -> None:
        """Persist the set (lock held): temp file + fsync + rename + fsync of the folder."""
        data = {"format": FORMAT, "deleted": sorted(self._entries.values(), key=lambda e: e["product_id"])}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(data, fh, ensure_ascii=False, indent=1)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise TombstoneError(f"{self.path}: cannot write live deletes ({exc})") from exc

    def ids(self) -> frozenset[str]:
        """The product ids deleted now."""
        with self._lock:
            return frozenset(self._entries)

    def delete(self, index, product_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Hide ``product_ids`` from ``index`` (the served ``IndexVersion``) at once, persisted
        first. Returns ``(deleted, unknown)``: ids now hidden, ids ``index`` does not hold."""
        wanted = list(dict.fromkeys(product_ids))
        known = index.internal_ids(wanted)
        deleted = [pid for pid, iid in zip(wanted, known) if iid >= 0]
        unknown = [pid for pid, iid in zip(wanted, known) if iid < 0]
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            before = dict(self._entries)
            for pid in deleted:
                self._entries.setdefault(pid, {"product_id": pid, "version": index.version, "deleted_utc": now})
            if self._entries != before:
                self._write_or_restore(before)
            self._indexes.add(index)
            self._hide()
        return deleted, unknown

    def _write_or_restore(self, before: dict) -> None:
        """Persist the entries; on failure put ``before`` back and re-raise (TombstoneError). Lock held."""
        try:
            self._write()
        except TombstoneError:
            self._entries = before
            raise

    def restore(self, index, product_ids: Iterable[str]) -> list[str]:
        """Show ``product_ids`` again in ``index``; returns those that were deleted."""
        with self._lock:
            restored = [pid for pid in dict.fromkeys(product_ids) if pid in self._entries]
            if restored:
                before = dict(self._entries)
                for pid in restored:
                    del self._entries[pid]
                self._write_or_restore(before)
            self._indexes.add(index)
            self._hide()
        return restored

    def apply(self, index) -> int:
        """Before ``index`` is served: drop the deletes it already includes (products it does
        not hold), persist, and hide the rest in it. Returns how many deletes were dropped."""
        with self._lock:
            pids = list(self._entries)
            held = index.internal_ids(pids) if pids else []
            done = [pid for pid, iid in zip(pids, held) if iid < 0]
            for pid in done:
                del self._entries[pid]
            if done:
                self._write()
                log.info("live deletes: %d included in version %s and dropped; %d still hidden", len(done),
                         index.version, len(self._entries))
            outgoing = [other for other in self._indexes if other is not index]
            self._indexes.add(index)
            self._hide()
            for other in outgoing:  # versions still serving in-flight requests keep hiding them
                other.hidden = other.hidden | frozenset(done)
            return len(done)

"""Index root layout, atomic publication of index versions, keep-last-K, stale cleanup.

Layout of ROOT (our choice)::

    ROOT/CURRENT              one line: the live version name
    ROOT/versions/<version>/  immutable, complete index versions
    ROOT/tmp/                 build work folders (resumable encode chunks, staged version)
    ROOT/.build.lock          flock held by the running build

A build stages everything under ``ROOT/tmp``, fsyncs it, renames the staged folder into
``ROOT/versions/<version>`` (atomic on one file system), then writes ``CURRENT.tmp`` and
renames it over ``CURRENT`` (atomic). A process killed at any moment therefore leaves
``CURRENT`` naming the old, complete version. Leftovers under ``ROOT/tmp`` are removed by
the next build (except a work folder it resumes). Source: our choice (the classic
write-temp + fsync + rename pattern).
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from indexer.errors import BuildError, IndexVersionError, NoCurrentVersionError
from indexer.manifest import MANIFEST

CURRENT = "CURRENT"
VERSIONS = "versions"
TMP = "tmp"
LOCK = ".build.lock"


def new_version_id(now: datetime | None = None) -> str:
    """A sortable, unique version name: ``YYYYmmddTHHMMSSmmmZ-<8 hex>`` (UTC, milliseconds)."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%S')}{now.microsecond // 1000:03d}Z-{secrets.token_hex(4)}"


# flock belongs to the open file, which forked children (DataLoader workers) share: a
# worker outliving a killed build would keep ROOT locked. Children close their copy.
_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """Hold ``ROOT/.build.lock`` (flock, released by the kernel if the process dies; forked
    children do not keep it).

    Raises BuildError when another build holds it.
    """
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    _LOCK_FDS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise BuildError(f"{root}: another index build is running ({LOCK} is locked)") from exc
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        _LOCK_FDS.discard(fd)
        os.close(fd)  # closing releases the flock


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames / creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (inclusive)."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def tmp_dir(root: Path) -> Path:
    """``ROOT/tmp`` (created)."""
    path = root / TMP
    path.mkdir(parents=True, exist_ok=True)
    return path


def cleanup_stale(root: Path, keep: set[str] = frozenset()) -> list[str]:
    """Remove everything under ``ROOT/tmp`` except the names in ``keep``; call with the
    build lock held. Returns the names removed."""
    removed = []
    base = root / TMP
    if not base.is_dir():
        return removed
    for entry in sorted(base.iterdir()):
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def read_current(root: Path) -> str | None:
    """The version named by ``ROOT/CURRENT`` (stripped), or None when there is none yet
    (no file, or an empty one). The one reader of ``CURRENT`` (the indexer and the server's
    watcher); ``publish_version`` replaces the file atomically, so a read never sees half."""
    try:
        name = (Path(root) / CURRENT).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, IsADirectoryError):
        return None
    return name or None


def resolve_version_dir(path: str | Path) -> Path:
    """An index root (``CURRENT`` inside) or a version folder -> the version folder.

    Raises NoCurrentVersionError / IndexVersionError with the path in the message.
    """
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    if (p / CURRENT).is_file() or (p / VERSIONS).is_dir():
        name = read_current(p)
        if name is None:
            raise NoCurrentVersionError(f"{p}: no {CURRENT} file (no index version published yet)")
        target = p / VERSIONS / name
        if not (target / MANIFEST).is_file():
            raise NoCurrentVersionError(f"{p}/{CURRENT} names {name!r} but {target} is not a complete index version")
        return target
    raise IndexVersionError(f"{p}: neither an index root (with {CURRENT}) nor an index version (with {MANIFEST})")


def publish_version(root: Path, staged: Path, version: str) -> Path:
    """Move the complete folder ``staged`` to ``ROOT/versions/<version>`` and make it CURRENT.

    Both steps are renames after fsync, so a crash leaves either the old or the new
    version live, never a partial one. Returns the published folder.
    """
    versions = root / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    target = versions / version
    if target.exists():
        raise BuildError(f"{target}: version already exists")
    fsync_tree(staged)
    os.rename(staged, target)
    fsync_dir(versions)
    pointer = root / f"{CURRENT}.tmp"
    with open(pointer, "w", encoding="utf-8") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(pointer, root / CURRENT)
    fsync_dir(root)
    return target


def prune_versions(root: Path, keep_last: int) -> list[str]:
    """Delete all but the ``keep_last`` newest versions (never the CURRENT one).

    A version is first renamed into ``ROOT/tmp`` and then deleted, so a crash never leaves
    a half-deleted folder under ``versions/``. Returns the names removed.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    versions = root / VERSIONS
    if not versions.is_dir():
        return []
    current = read_current(root)
    names = sorted((p.name for p in versions.iterdir() if p.is_dir()), reverse=True)
    keep = set(names[:keep_last]) | ({current} if current else set())
    removed = []
    for name in names:
        if name in keep:
            continue
        trash = tmp_dir(root) / f"trash-{name}-{int(time.time())}"
        os.rename(versions / name, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(name)
    if removed:
        fsync_dir(versions)
    return removed


def list_versions(root: Path) -> list[str]:
    """Version names under ``ROOT/versions``, oldest first."""
    versions = root / VERSIONS
    return sorted(p.name for p in versions.iterdir() if p.is_dir()) if versions.is_dir() else []

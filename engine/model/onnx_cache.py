"""A folder of exported ONNX tower graphs, reused across server starts.

Exporting a tower's three ONNX paths (``engine.model.tower_onnx``) takes seconds at every
server start-up; the file depends only on the model and the exporting software, so it is
kept in a cache folder (by default ``<model folder>/../cache/onnx``) under a key over:
the model fingerprint (sha256 of the model folder's config + weights, so backbone and
fusion config are covered), the tower, the kind of batch, the variant ("fp32" or an int8
recipe), the ONNX opset, ``EXPORT_FORMAT`` (bumped when the export code changes) and the
torch / onnx / onnxruntime versions.

Each entry is ``<key>.onnx`` plus ``<key>.json``, a record with the file's sha256 and size
(and whatever the writer adds, e.g. the int8 gate's measured cosine). Both are written
atomically (temporary file in the same folder, fsync, rename), the graph first, so a reader
sees a complete record or none. An entry whose graph is missing or whose bytes do not match
the recorded sha256 (a partial or corrupted file) is deleted with a warning and exported
again. Source: our choice.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from engine.model.file_hashing import sha256_file

log = logging.getLogger(__name__)

# bump when engine.model.tower_onnx's export changes the graphs it writes (2: batches of one kind
# exported without the fusion encoder's per-row selections, FusionEncoder.forward's ``kind``)
EXPORT_FORMAT = 2


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class OnnxCache:
    """Exported ONNX graphs of one model, in ``folder`` (created on first store).

    ``model_fingerprint``: ``TwoTowerModel.fingerprint`` (hex sha256); ``opset``: the ONNX
    opset the graphs are exported with. Safe for several processes: writes are atomic and
    a torn entry is detected by its checksum.
    """

    def __init__(self, folder: str | Path, model_fingerprint: str, opset: int):
        if not model_fingerprint:
            raise ValueError("an ONNX cache needs the model's fingerprint (a model loaded from a folder)")
        self.folder = Path(folder)
        self.model_fingerprint = model_fingerprint
        self.opset = opset

    def key(self, tower: str, kind: str, variant: str) -> str:
        """Hex sha256 (first 32 digits) naming the entry of ``tower``'s ``kind`` path in ``variant``."""
        material = {"model": self.model_fingerprint, "tower": tower, "kind": kind, "variant": variant,
                    "opset": self.opset, "export_format": EXPORT_FORMAT, **_versions()}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]

    def _files(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.onnx", self.folder / f"{key}.json"

    def lookup(self, key: str) -> tuple[Path | None, dict] | None:
        """``(graph file, record)`` of a complete, intact entry; ``(None, record)`` for a
        stored refusal (``store_refusal``); None when there is none. A torn or corrupted
        entry is deleted (with a warning) and reported as none."""
        graph, record_file = self._files(key)
        if not self.folder.is_dir():
            return None
        try:
            record = json.loads(record_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return self._discard(key, f"unreadable record ({exc})")
        if isinstance(record, dict) and record.get("refused"):
            return None, record
        try:
            digest = sha256_file(graph)
        except OSError as exc:
            return self._discard(key, f"graph file unreadable ({exc})")
        if not isinstance(record, dict) or digest != record.get("sha256"):
            return self._discard(key, f"sha256 {digest[:12]} differs from the recorded "
                                      f"{str(record.get('sha256') if isinstance(record, dict) else None)[:12]}")
        return graph, record

    def discard(self, key: str, reason: str) -> None:
        """Delete entry ``key`` (e.g. ONNX Runtime cannot load it), with a warning saying why."""
        self._discard(key, reason)

    def _discard(self, key: str, reason: str) -> None:
        log.warning("ONNX cache: entry %s in %s is corrupt or partial (%s); exporting it again",
                    key, self.folder, reason)
        for path in self._files(key):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # the export still runs; storing it will say what is wrong
                log.warning("ONNX cache: cannot delete %s (%s)", path, exc)

    def store_refusal(self, key: str, reason: str, record: dict) -> None:
        """Record that entry ``key`` was built and refused (``reason``; ``record``: the
        figures), so later starts skip the work. A warning when the folder cannot be written."""
        full = {**record, "refused": reason, "model_fingerprint": self.model_fingerprint, **_versions()}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._files(key)[0].unlink(missing_ok=True)
            _atomic_write(self._files(key)[1], lambda tmp: tmp.write_text(json.dumps(full, indent=1, sort_keys=True)))
        except OSError as exc:
            log.warning("ONNX cache: cannot write %s (%s)", self.folder, exc)

    def store(self, key: str, graph: Path, record: dict | None = None) -> tuple[Path, dict] | None:
        """Copy the exported ``graph`` into the cache as entry ``key`` with ``record`` (JSON
        values) plus its sha256 and size. Returns the cached ``(file, record)``, or None
        (with a warning) when the folder cannot be written: the caller uses ``graph``."""
        target, record_file = self._files(key)
        full = {**(record or {}), "sha256": sha256_file(graph), "bytes": graph.stat().st_size,
                "model_fingerprint": self.model_fingerprint, "opset": self.opset,
                "export_format": EXPORT_FORMAT, **_versions()}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write(target, lambda tmp: shutil.copyfile(graph, tmp))
            _atomic_write(record_file, lambda tmp: tmp.write_text(json.dumps(full, indent=1, sort_keys=True)))
        except OSError as exc:
            log.warning("ONNX cache: cannot write %s (%s); the graph is exported again at the next start",
                        self.folder, exc)
            return None
        return target, full

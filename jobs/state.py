"""What is finished: atomic writes and done markers.

A stage's output folder counts as done only when ``DONE.json`` exists and every file it lists has the
recorded size and SHA-256. Files are written to a temporary name in the same folder and renamed, so a
crash leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

DONE_MARKER = "DONE.json"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates 0600; results follow the user's umask like any other file they write.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mark_done(folder: Path, files: Iterable[str], extra: dict[str, Any] | None = None) -> None:
    """Record ``files`` (relative to ``folder``) with their checksums; call after they are written."""
    entries = {}
    for name in files:
        path = folder / name
        entries[name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    atomic_write_json(folder / DONE_MARKER, {"files": entries, **(extra or {})})


def clear_done(folder: Path) -> None:
    (folder / DONE_MARKER).unlink(missing_ok=True)


def is_done(folder: Path, verify_checksums: bool = False) -> bool:
    """True when the marker exists and its files are all present at the recorded size (and hash)."""
    marker = folder / DONE_MARKER
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, entry in recorded.items():
        path = folder / name
        try:
            if path.stat().st_size != entry["bytes"]:
                return False
        except OSError:
            return False
        if verify_checksums and sha256_of(path) != entry["sha256"]:
            return False
    return True


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())

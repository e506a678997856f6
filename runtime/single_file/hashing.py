"""sha256 of checkpoint files, cached by (path, size, mtime) so a multi-gigabyte file is hashed once.

A1111 (1.0 and later) writes the first 10 hex digits of the whole file's sha256 as `Model hash` (and `VAE hash`)
in its infotexts and keeps the full hashes in a cache.json; sdrt keeps them in `<engines>/single-file/hashes.json`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..manifest import atomic_write_bytes

SHORT_HASH = 10  # A1111's short model hash
_CHUNK = 1 << 20


class HashCache:
    """Full sha256 hashes by file; `save()` persists new entries (called only once a conversion succeeded)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        self.entries: dict = data if isinstance(data, dict) else {}
        self.changed = False

    def sha256(self, file: Path) -> str:
        """The sha256 hex digest of `file`, from the cache when its size and mtime are unchanged."""
        key = str(file.resolve())
        stat = file.stat()
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return str(entry["sha256"])
        digest = hashlib.sha256()
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
        self.changed = True
        return digest.hexdigest()

    def save(self) -> None:
        if self.changed:
            atomic_write_bytes(self.path, json.dumps(self.entries, indent=1, sort_keys=True).encode("utf-8"))
            self.changed = False

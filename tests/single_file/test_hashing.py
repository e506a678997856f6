"""The sha256 cache: a file is hashed once per (path, size, mtime), as A1111 keeps its cache.json."""

from __future__ import annotations

import hashlib
import os

from runtime.single_file.hashing import HashCache


def test_hash_is_cached_by_size_and_mtime(tmp_path):
    path, cache_file = tmp_path / "model.safetensors", tmp_path / "cache" / "hashes.json"
    path.write_bytes(b"a" * 1000)
    first = HashCache(cache_file)
    assert first.sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert not cache_file.exists()  # nothing written until save() (a failed conversion leaves nothing)
    first.save()
    stat = path.stat()
    path.write_bytes(b"b" * 1000)  # same size; the old mtime restored: the cache cannot tell
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert HashCache(cache_file).sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()  # not read again
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert HashCache(cache_file).sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_unreadable_cache_is_ignored(tmp_path):
    cache_file = tmp_path / "hashes.json"
    cache_file.write_text("{not json")
    path = tmp_path / "f"
    path.write_bytes(b"x")
    assert HashCache(cache_file).sha256(path) == hashlib.sha256(b"x").hexdigest()

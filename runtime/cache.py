"""The per-user artifact cache: where exports (ONNX, manifests, converted single files, engines) live by default.

`$SDRT_HOME` names the cache's root, as `HF_HOME` does for huggingface-hub; without it the root is
`$XDG_CACHE_HOME/sdrt`, else `~/.cache/sdrt`. Artifacts go to `<root>/engines/`, so a model loaded from any
folder finds its earlier export. An explicit engines folder (`--engines DIR`, `engines_dir=`) takes precedence.
`ensure_exported` gives a checkpoint's complete artifact folder, exporting it first when missing or broken.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError, InvalidRequestError, ModelError
from .manifest import MANIFEST_NAME, REEXPORT_HINT, artifact_problem, read_manifest

logger = logging.getLogger(__name__)

HOME_VARIABLE = "SDRT_HOME"
ENGINES_FOLDER = "engines"
SINGLE_FILE_FOLDER = "single-file"  # runtime.single_file's converted checkpoints
UPSCALER_FOLDER = "upscalers"  # runtime.upscalers' exported upscaler models
NESTED_KINDS = {SINGLE_FILE_FOLDER: "single file", UPSCALER_FOLDER: "upscaler"}  # folders of entries, by kind
_ENTRY_NAME = re.compile(r"^[\w.-]+-[0-9a-f]{10}$")  # runtime.checkpoint.model_key: <name>-<short hash>


def sdrt_home() -> Path:
    """The cache root: $SDRT_HOME, else $XDG_CACHE_HOME/sdrt, else ~/.cache/sdrt."""
    if os.environ.get(HOME_VARIABLE):
        return Path(os.environ[HOME_VARIABLE]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "sdrt"


def default_engines_dir() -> Path:
    """The artifact folder used when none is given: <sdrt_home()>/engines."""
    return sdrt_home() / ENGINES_FOLDER


def engines_dir_or_default(engines_dir: str | os.PathLike | None) -> Path:
    """`engines_dir` as a Path, or the default artifact folder when it is None or empty."""
    return Path(engines_dir).expanduser() if engines_dir else default_engines_dir()


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    name: str  # the folder relative to the engines folder: "<model>-<hash>" or "single-file/<stem>-<hash>-..."
    size: int  # bytes under the folder
    kind: str  # "export", "unfinished export" (no manifest yet), "single file" (a converted checkpoint), "upscaler"


def cache_entries(engines_dir: Path) -> list[CacheEntry]:
    """The artifact folders under `engines_dir` (exports, converted single files, exported upscalers), by name."""
    folders = []
    if engines_dir.is_dir():
        folders = [p for p in engines_dir.iterdir() if p.is_dir() and _ENTRY_NAME.match(p.name)]
        for nested in NESTED_KINDS:
            if (engines_dir / nested).is_dir():
                folders += [p for p in (engines_dir / nested).iterdir() if p.is_dir()]
    entries = [CacheEntry(p, p.relative_to(engines_dir).as_posix(), _folder_size(p), _kind(p)) for p in folders]
    return sorted(entries, key=lambda e: e.name)


def _kind(folder: Path) -> str:
    if folder.parent.name in NESTED_KINDS:
        return NESTED_KINDS[folder.parent.name]
    return "export" if (folder / MANIFEST_NAME).is_file() else "unfinished export"


def clear_cache(engines_dir: Path, names: list[str] | None = None) -> list[CacheEntry]:
    """Delete the cache entries named (as `cache_entries` names them, or by their folder's own name), or all when
    `names` is empty; return what was deleted. Only artifact folders are touched: other files stay."""
    entries = cache_entries(engines_dir)
    if names:
        wanted = set(names)
        unknown = sorted(wanted - {e.name for e in entries} - {e.path.name for e in entries})
        if unknown:
            raise InvalidRequestError(
                f"no cache entry named {', '.join(unknown)} in {engines_dir} (cli.py cache list)"
            )
        entries = [e for e in entries if e.name in wanted or e.path.name in wanted]
    for entry in entries:
        shutil.rmtree(entry.path)
    single = engines_dir / SINGLE_FILE_FOLDER
    if single.is_dir() and not any(single.iterdir()):
        single.rmdir()
    return entries  # (the upscaler folder keeps its hashes.json: a cache of file hashes, not of artifacts)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def ensure_exported(
    checkpoint: Path, engines_dir: Path, key: str, progress: bool, allow_pickle: bool = False, force: bool = False
) -> Path:
    """The artifact folder of `checkpoint`, exporting it first when it is missing, broken or `force`; a broken
    one (a file missing or of another size than its manifest says) is reported in one warning line."""
    folder = engines_dir / key
    if not force:
        problem = _artifact_problem(folder)
        if problem is None:
            return folder
        if folder.exists():
            logger.warning("%s; exporting %s again", problem, checkpoint)
        else:
            logger.info("exporting %s to %s (first use)", checkpoint, folder)
    try:
        from export import export_model
    except ImportError as exc:
        raise ModelError(
            f"{checkpoint} has not been exported yet and exporting needs the export extras "
            f"(pip install -e .[export]): {exc}"
        ) from exc
    return export_model(checkpoint, engines_dir, force=force, progress=progress, allow_pickle=allow_pickle)


def _artifact_problem(folder: Path) -> str | None:
    """What is wrong with an artifact folder (runtime.manifest.artifact_problem), or None when it is complete."""
    try:
        return artifact_problem(folder, read_manifest(folder))
    except ArtifactError as exc:
        if not (folder / MANIFEST_NAME).exists():
            return f"{folder} has no {MANIFEST_NAME} (an unfinished export)"
        return str(exc).removesuffix(REEXPORT_HINT)

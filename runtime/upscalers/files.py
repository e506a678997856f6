"""Upscaler files: which files of a folder are upscalers, their A1111 names, their tensors, and their export.

A1111 1.10 lists user models by file stem (modules/modelloader.py friendly_name) and shows the Real-ESRGAN models it
knows by their display names ("R-ESRGAN 4x+" for RealESRGAN_x4plus.pth, ...; modules/realesrgan_model.py). Its
/upscalers route reports `scale` 4 for every user file (UpscalerData's default) and the table's scale for the
Real-ESRGAN ones; sdrt reports the same. A stem present as .safetensors and as a pickle is the .safetensors file.

Each file is exported once (export.upscalers) into `<engines>/upscalers/<stem>-<sha256[:10]>/`: `<that name>.onnx`
(named after its folder, so openvino's compile cache keeps one entry per model), `<that name>-fp16.onnx` where
spandrel says the architecture supports half precision (the GPU backends' model), and `upscaler.json` (the
architecture, scale, padding and memory facts the runtime needs), written to a temporary folder and renamed into
place, so a folder with `upscaler.json` is always complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache import sdrt_home
from ..errors import InvalidRequestError, ModelError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth", ".pt")  # what A1111's ESRGAN, SwinIR, HAT and DAT folders hold
UPSCALER_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)  # preference order for one stem
FOLDER_NAME = "upscalers"  # under $SDRT_HOME, and under an engines folder for the exports
META_FILE = "upscaler.json"
EXPORT_VERSION = 2  # bump when the exported folders change, so old ones are not reused (2: the fp16 model)
SHORT_HASH = 10
DEFAULT_SCALE = 4  # A1111's UpscalerData scale for user files

# A1111's Real-ESRGAN models: file stem -> (display name, scale)
REAL_ESRGAN = {
    "realesr-general-x4v3": ("R-ESRGAN General 4xV3", 4),
    "realesr-general-wdn-x4v3": ("R-ESRGAN General WDN 4xV3", 4),
    "realesr-animevideov3": ("R-ESRGAN AnimeVideo", 4),
    "RealESRGAN_x4plus": ("R-ESRGAN 4x+", 4),
    "RealESRGAN_x4plus_anime_6B": ("R-ESRGAN 4x+ Anime6B", 4),
    "RealESRGAN_x2plus": ("R-ESRGAN 2x+", 2),
}


@dataclass(frozen=True)
class UpscalerFile:
    """One upscaler as /sdapi/v1/upscalers lists it (A1111's fields); `path` is None for the built-ins."""

    name: str  # A1111's display name: the Real-ESRGAN table's, else the file stem
    path: Path | None
    scale: float
    model_name: str | None = None  # A1111 names the Upscaler class's model here; sdrt: the file stem

    def as_a1111(self) -> dict:
        """The item of A1111's /sdapi/v1/upscalers: name, model_name, model_path, model_url, scale."""
        path = None if self.path is None else str(self.path)
        return {"name": self.name, "model_name": self.model_name, "model_path": path, "model_url": None,
                "scale": self.scale}  # fmt: skip


def default_upscaler_dir() -> Path:
    """The upscaler folder used when none is given: <sdrt_home()>/upscalers."""
    return sdrt_home() / FOLDER_NAME


def upscaler_files(folder: Path | None) -> list[UpscalerFile]:
    """The upscaler files under `folder` (searched recursively, as A1111 does), one per stem, sorted by name
    (case-insensitive); an absent folder has none."""
    folder = Path(folder) if folder is not None else default_upscaler_dir()
    if not folder.is_dir():
        return []
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        suffix = path.suffix.lower()
        if suffix not in UPSCALER_SUFFIXES or not path.is_file():
            continue
        known = by_stem.get(path.stem)
        if known is None or UPSCALER_SUFFIXES.index(suffix) < UPSCALER_SUFFIXES.index(known.suffix.lower()):
            by_stem[path.stem] = path
    files = []
    for stem, path in by_stem.items():
        name, scale = REAL_ESRGAN.get(stem, (stem, DEFAULT_SCALE))
        files.append(UpscalerFile(name, path, scale, stem))
    return sorted(files, key=lambda f: f.name.lower())


def read_upscaler_file(path: Path, allow_pickle: bool) -> dict:
    """The tensors of an upscaler file as numpy arrays: a .safetensors file's flat dict, or the object a torch.save'd
    .pth/.pt holds (often {"params_ema": {...}}), read by runtime.torch_pickle's restricted unpickler, which never
    runs the file's code; pickles only with `allow_pickle`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from ..safetensors_reader import read_safetensors

        tensors, _ = read_safetensors(path, ModelError)
        data: object = tensors
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(
                f"{path} is a pickle, which can run code when loaded: convert it to .safetensors, or allow pickles "
                "(--allow-pickle, allow_pickle=True) if you trust it; it is then read without running any code"
            )
        from ..torch_pickle import load_torch_file

        data = load_torch_file(path)
    else:
        raise ModelError(f"{path}: an upscaler file must end in {', '.join(UPSCALER_SUFFIXES)}")
    if not isinstance(data, dict) or not _has_tensor(data):
        raise ModelError(f"{path} holds no tensors, so it is not an upscaler model")
    return data


def _has_tensor(data: dict, depth: int = 0) -> bool:
    return any(
        isinstance(v, np.ndarray) or (isinstance(v, dict) and depth < 2 and _has_tensor(v, depth + 1))
        for v in data.values()
    )


def artifact_folder(engines_dir: Path, path: Path, sha256: str) -> Path:
    """Where the export of upscaler file `path` (whose sha256 is `sha256`) lives."""
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.stem) or "upscaler"
    return Path(engines_dir) / FOLDER_NAME / f"{stem}-{sha256[:SHORT_HASH]}"


def model_path(folder: Path) -> Path:
    """The ONNX file of an export folder."""
    return folder / f"{folder.name}.onnx"


def fp16_model_path(folder: Path, meta: dict) -> Path | None:
    """The fp16 ONNX file of an export folder (for the GPU backends); None where the architecture has none."""
    name = meta.get("fp16_model")
    return None if not name else folder / name


def file_sha256(engines_dir: Path, path: Path) -> str:
    """The sha256 of `path`, cached by size and mtime in `<engines>/upscalers/hashes.json`."""
    from ..single_file.hashing import HashCache

    hashes = HashCache(Path(engines_dir) / FOLDER_NAME / "hashes.json")
    digest = hashes.sha256(Path(path))
    hashes.save()
    return digest


def read_meta(folder: Path) -> dict | None:
    """The facts of a finished export in `folder`; None when there is none (or one of another export version)."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("export_version") != EXPORT_VERSION:
        return None
    if not model_path(folder).is_file():
        return None
    return meta


def check_folder(folder: Path | None) -> Path:
    """`folder` (default: default_upscaler_dir()) as a Path; InvalidRequestError when a given one is no folder."""
    if folder is None:
        return default_upscaler_dir()
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InvalidRequestError(f"upscaler folder {folder} does not exist")
    return folder

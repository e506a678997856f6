"""Upscaler models (runtime.upscalers over export.upscalers) against spandrel's torch model run the A1111 1.10 way.

The reference below is a transcription of A1111's modules/upscaler_utils.py (upscale_pil_patch, upscale_with_model,
tiled_upscale_2, upscale_2), modules/images.py (split_grid, combine_grid; Pillow's masked paste written out as its
integer blend) and modules/upscaler.py (Upscaler.upscale), driving spandrel's ImageModelDescriptor in torch. The
models are random-weight spandrel architectures in small configurations, saved as a user would have them.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from PIL import Image

import cli
from tests.conftest import HAS_TORCH

if not HAS_TORCH:
    pytest.skip("exporting upscalers needs torch (export extras)", allow_module_level=True)
try:
    from export.upscalers import import_spandrel

    spandrel = import_spandrel()
except Exception as exc:  # BackendUnavailableError: spandrel is not installed
    pytest.skip(f"spandrel is not installed ({exc})", allow_module_level=True)

import torch  # noqa: E402

from runtime.errors import InvalidRequestError, ModelError, ResourceError  # noqa: E402
from runtime.upscalers import list_upscalers, load_upscaler  # noqa: E402

TILE, OVERLAP = 192, 8  # A1111's defaults
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")  # spandrel's SwinIR, in torch


def _models() -> dict:
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.HAT import HAT
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    return {
        "RealESRGAN_x4plus": ESRGAN(num_filters=8, num_blocks=1, scale=4),  # RRDB, listed as "R-ESRGAN 4x+"
        "compact-2x": Compact(num_feat=8, num_conv=2, upscale=2),  # SRVGG
        "swinir-2x": SwinIR(
            img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2, upsampler="pixelshuffle"
        ),
        "hat-2x": HAT(  # pads its input to its window after normalising it: the runtime pads on the host instead
            img_size=16,
            embed_dim=12,
            depths=[1],
            num_heads=[2],
            window_size=4,
            upscale=2,
            upsampler="pixelshuffle",
            compress_ratio=3,
            squeeze_factor=4,
        ),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Random-weight models saved as upscaler files: safetensors, and one .pth torch.save wrote."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("upscalers")
    for stem, model in _models().items():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"{stem}.safetensors")
    compact = _models()["compact-2x"]
    torch.save({"params": compact.state_dict()}, folder / "compact-pickled.pth")
    return folder


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return tmp_path_factory.mktemp("upscaler-engines")


def descriptor_of(folder, stem):
    from safetensors.torch import load_file

    return spandrel.MAIN_REGISTRY.load(load_file(folder / f"{stem}.safetensors")).eval()


# ---- A1111 1.10, transcribed over the torch model -------------------------------------------------------------


def a1111_patch(descriptor, tile: Image.Image) -> Image.Image:
    """upscale_pil_patch: RGB -> BGR / 255 (float64, then the model's float32), the model, clamp, x255, round."""
    bgr = np.array(tile.convert("RGB"))[:, :, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(np.transpose(bgr, (2, 0, 1))) / 255).unsqueeze(0).float()
    with torch.inference_mode():
        return a1111_to_pil(descriptor(tensor))


def a1111_to_pil(tensor) -> Image.Image:
    arr = tensor.squeeze(0).float().clamp_(0, 1).numpy()
    arr = (255.0 * np.moveaxis(arr, 0, 2)).round().astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def blend(dst: np.ndarray, src: np.ndarray, top: int, left: int, mask: np.ndarray | None) -> None:
    """Image.paste(src, (left, top), mask): clipped to dst; with an L mask, Pillow's (src m + dst (255 - m) + 128)
    / 255 in integers."""
    h, w = src.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, dst.shape[0]), min(left + w, dst.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    part = src[y0 - top : y1 - top, x0 - left : x1 - left].astype(np.int64)
    if mask is None:
        dst[y0:y1, x0:x1] = part
        return
    m = mask[y0 - top : y1 - top, x0 - left : x1 - left, None].astype(np.int64)
    t = part * m + dst[y0:y1, x0:x1].astype(np.int64) * (255 - m) + 128
    dst[y0:y1, x0:x1] = (t + (t >> 8)) >> 8


def a1111_grid(descriptor, image: Image.Image, tile: int, overlap: int) -> Image.Image:
    """upscale_with_model: split_grid, each tile through upscale_pil_patch, combine_grid."""
    w, h = image.size
    cols, rows = math.ceil((w - overlap) / (tile - overlap)), math.ceil((h - overlap) / (tile - overlap))
    dx = (w - tile) / (cols - 1) if cols > 1 else 0
    dy = (h - tile) / (rows - 1) if rows > 1 else 0
    s = descriptor.scale
    out = np.zeros((h * s, w * s, 3), np.uint8)
    ov = overlap * s
    ramp = (np.arange(ov, dtype=np.float32) * 255 / ov).astype(np.uint8)
    for r in range(rows):
        y = int(r * dy) if int(r * dy) + tile < h else h - tile
        row = np.zeros((tile * s, w * s, 3), np.uint8)
        for c in range(cols):
            x = int(c * dx) if int(c * dx) + tile < w else w - tile
            up = np.asarray(a1111_patch(descriptor, image.crop((x, y, x + tile, y + tile))))
            if x == 0:
                blend(row, up, 0, 0, None)
            else:
                blend(row, up[:, :ov], 0, x * s, np.tile(ramp[None, :], (tile * s, 1)))
                blend(row, up[:, ov:], 0, x * s + ov, None)
        if y == 0:
            blend(out, row, 0, 0, None)
        else:
            blend(out, row[:ov], y * s, 0, np.tile(ramp[:, None], (1, w * s)))
            blend(out, row[ov:], y * s + ov, 0, None)
    return Image.fromarray(out, "RGB")


def a1111_weighted(descriptor, image: Image.Image, tile: int, overlap: int) -> Image.Image:
    """upscale_2 / tiled_upscale_2 (SwinIR): float32 tiles summed and divided by their coverage."""
    bgr = np.array(image.convert("RGB"))[:, :, ::-1]
    img = torch.from_numpy(np.ascontiguousarray(np.transpose(bgr, (2, 0, 1))) / 255).float().unsqueeze(0)
    _, c, h, w = img.size()
    tile = min(tile, h, w)
    stride, s = tile - overlap, descriptor.scale
    result = torch.zeros(1, c, h * s, w * s)
    weights = torch.zeros_like(result)
    with torch.no_grad():
        for hi in list(range(0, h - tile, stride)) + [h - tile]:
            for wi in list(range(0, w - tile, stride)) + [w - tile]:
                patch = descriptor(img[..., hi : hi + tile, wi : wi + tile])
                result[..., hi * s : (hi + tile) * s, wi * s : (wi + tile) * s].add_(patch)
                weights[..., hi * s : (hi + tile) * s, wi * s : (wi + tile) * s].add_(torch.ones_like(patch))
    return a1111_to_pil(result.div_(weights))


def a1111_upscale(do_upscale, image: Image.Image, scale: float) -> Image.Image:
    """Upscaler.upscale: up to three passes until the target is covered, then Lanczos to it."""
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for i in range(3):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = image.size
        image = do_upscale(image)
        if shape == image.size:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
    return image


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---- parity --------------------------------------------------------------------------------------------------

CPU = ("torch", "onnxruntime")
ALL_CPU = CPU + (("openvino",) if importlib.util.find_spec("openvino") else ())
CASES = [  # (name, stem, image size, scale, tile, overlap, backends)
    pytest.param("R-ESRGAN 4x+", "RealESRGAN_x4plus", (100, 90), 4, 64, 8, CPU, id="rrdb-2x2-tiles"),
    pytest.param("R-ESRGAN 4x+", "RealESRGAN_x4plus", (150, 90), 3, TILE, OVERLAP, CPU, id="rrdb-smaller-than-tile"),
    pytest.param("compact-2x", "compact-2x", (61, 45), 5, 24, 6, ALL_CPU, id="srvgg-three-passes"),
    pytest.param("swinir-2x", "swinir-2x", (70, 54), 2, 30, 8, CPU, id="swinir-weighted-tile-off-window"),
    pytest.param("swinir-2x", "swinir-2x", (30, 12), 2, TILE, OVERLAP, CPU, id="swinir-image-below-tile-and-minimum"),
    pytest.param("hat-2x", "hat-2x", (45, 37), 2, 30, 8, CPU, id="hat-grid-tile-off-window"),
]


@pytest.mark.parametrize("name, stem, size, scale, tile, overlap, backends", CASES)
def test_model_upscale_equals_a1111_over_spandrel(folder, engines, name, stem, size, scale, tile, overlap, backends):
    descriptor = descriptor_of(folder, stem)
    image = random_image(*size)
    tiled = a1111_weighted if stem.startswith("swinir") else a1111_grid
    expected = np.asarray(a1111_upscale(lambda im: tiled(descriptor, im, tile, overlap), image, scale))
    for backend in backends:
        upscaler = load_upscaler(
            name, folder, backend=backend, engines_dir=engines, tile_size=tile, tile_overlap=overlap
        )
        got = np.asarray(upscaler.upscale(image, scale))
        assert got.shape == expected.shape
        diff = np.abs(got.astype(int) - expected)
        if backend == "torch":  # the same model in the same float32 arithmetic: identical
            assert diff.max() == 0
        else:  # onnxruntime's and openvino's float32 kernels may move a value across a rounding boundary
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (backend, diff.max(), (diff > 0).mean())


def test_pickle_is_read_without_code_only_when_allowed(folder, engines):
    with pytest.raises(ModelError, match="pickle"):
        load_upscaler("compact-pickled", folder, engines_dir=engines)
    pickled = load_upscaler("compact-pickled", folder, engines_dir=engines, allow_pickle=True)
    safe = load_upscaler("compact-2x", folder, engines_dir=engines)
    image = random_image(40, 32, seed=3)
    assert np.array_equal(np.asarray(pickled.upscale(image, 2)), np.asarray(safe.upscale(image, 2)))


def test_export_is_cached_by_file_hash(folder, engines, tmp_path):
    load_upscaler("compact-2x", folder, engines_dir=tmp_path)
    exports = list((tmp_path / "upscalers").glob("compact-2x-*"))
    assert len(exports) == 1 and not list((tmp_path / "upscalers").glob(".*.tmp"))
    stamp = (exports[0] / "upscaler.json").stat().st_mtime_ns
    load_upscaler("compact-2x", folder, engines_dir=tmp_path)  # reused, not exported again
    assert (exports[0] / "upscaler.json").stat().st_mtime_ns == stamp


def test_unrecognised_file_is_refused(tmp_path, engines):
    from safetensors.numpy import save_file

    save_file({"foo.weight": np.zeros((3, 3), np.float32)}, tmp_path / "mystery.safetensors")
    with pytest.raises(ModelError, match="not a model spandrel"):
        load_upscaler("mystery", tmp_path, engines_dir=engines)


def test_listing_names_as_a1111(folder, engines):
    items = [item.as_a1111() for item in list_upscalers(folder)]
    assert [i["name"] for i in items] == ["None", "Lanczos", "Nearest", "compact-2x", "compact-pickled", "hat-2x",
                                          "R-ESRGAN 4x+", "swinir-2x"]  # fmt: skip
    esrgan = items[6]
    assert esrgan == {"name": "R-ESRGAN 4x+", "model_name": "RealESRGAN_x4plus", "model_url": None, "scale": 4,
                      "model_path": str(folder / "RealESRGAN_x4plus.safetensors")}  # fmt: skip
    assert load_upscaler("RealESRGAN_x4plus", folder, engines_dir=engines).name == "R-ESRGAN 4x+"  # by its stem


def test_memory_budget_is_checked_before_work(folder, engines):
    upscaler = load_upscaler("R-ESRGAN 4x+", folder, engines_dir=engines, memory_budget=64 * 2**20)
    upscaler.do_upscale = None  # any work would fail: the refusal must come first
    with pytest.raises(ResourceError, match=r"over the memory budget of 64 MiB; a tile size of at most \d+ fits"):
        upscaler.upscale(random_image(512, 512), 4)


def test_2048_output_fits_the_budget_with_a1111_tiles(folder, engines):
    """R-ESRGAN 4x+'s real shape (64 filters, 23 blocks) to 2048x2048 in 192-pixel tiles: well under a 2 GiB
    budget; without tiles it would not be."""
    upscaler = load_upscaler("R-ESRGAN 4x+", folder, engines_dir=engines)
    upscaler.meta = dict(upscaler.meta, memory={"bytes_per_pixel": 64 * 16 * 4.0, "weights_bytes": 67_000_000})
    assert upscaler.estimate(512, 512, 4) < 2 * 2**30 < upscaler.estimate(512, 512, 4, tile_size=0)


def test_cli_upscale_image(folder, engines, tmp_path, capsys):
    source = tmp_path / "in.png"
    random_image(40, 30, seed=5).save(source)
    out = tmp_path / "out.png"
    argv = ["--quiet", "upscale-image", "--input", str(source), "--upscaler", "compact-2x", "--upscaler-dir",
            str(folder), "--engines", str(engines), "--scale", "3", "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    descriptor = descriptor_of(folder, "compact-2x")
    expected = a1111_upscale(lambda im: a1111_grid(descriptor, im, TILE, OVERLAP), random_image(40, 30, 5), 3)
    with Image.open(out) as written:
        diff = np.abs(np.asarray(written).astype(int) - np.asarray(expected))
        assert written.size == (120, 88) and diff.max() <= 1
        assert written.info["parameters"] == "Postprocess upscale by: 3, Postprocess upscaler: compact-2x"
    npy = tmp_path / "out.npy"
    assert cli.main([*argv[:-1], str(npy)]) == 0
    assert np.array_equal(np.rint(np.load(npy)[0] * 255).astype(np.uint8), np.asarray(Image.open(out)))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--upscaler", "R-ESRGAN 9x"], "unknown upscaler 'R-ESRGAN 9x'; choose one of: None, Lanczos, Nearest"),
        (["--upscaler", "compact-pickled"], "is a pickle, which can run code"),
        (["--upscaler", "Lanczos", "--scale", "0"], "the upscale factor must be a positive number"),
        (["--upscaler", "compact-2x", "--tile-size", "16", "--tile-overlap", "16"], "the overlap must be"),
        (["--upscaler", "compact-2x", "--memory-budget", "1M"], "over the memory budget of 1 MiB"),
        (["--upscaler", "Lanczos", "--input", "missing.png"], "cannot read image missing.png"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(folder, tmp_path, capsys, extra, message):
    source = tmp_path / "in.png"
    random_image(24, 24).save(source)
    out = tmp_path / "out.png"
    argv = ["--quiet", "upscale-image", "--input", str(source), "--upscaler-dir", str(folder), "--engines",
            str(tmp_path / "engines"), "--output", str(out), *extra]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not list(tmp_path.glob("out*"))


def test_invalid_tiling_is_refused_at_load(folder):
    with pytest.raises(InvalidRequestError, match="overlap"):
        load_upscaler("compact-2x", folder, tile_size=8, tile_overlap=8)


def test_exported_upscaler_runs_without_torch(folder, engines):
    """Once exported, an upscaler runs from its ONNX file in a process where torch cannot be imported."""
    import subprocess
    import sys
    from pathlib import Path

    load_upscaler("compact-2x", folder, engines_dir=engines)  # exported here (or earlier in this module)
    script = (
        "import sys\nfor n in ('torch', 'spandrel'): sys.modules[n] = None\n"
        "from PIL import Image\nfrom runtime.upscalers import load_upscaler\n"
        f"u = load_upscaler('compact-2x', {str(folder)!r}, engines_dir={str(engines)!r})\n"
        "print(u.upscale(Image.new('RGB', (20, 16), 'red'), 2).size)"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(40, 32)"

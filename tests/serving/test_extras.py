"""A1111's extras routes (/sdapi/v1/extra-single-image, /extra-batch-images) and /upscalers, on the real server.

The reference is A1111 1.10's extras upscale transcribed here (scripts/postprocessing_upscale.py: scale by or scale
to, crop onto a black canvas, the second upscaler blended in; its info text and PNG chunks) over A1111's built-in
upscalers (tests.runtime.test_upscalers.a1111_builtin); a model upscaler through the route equals the same upscaler
loaded by hand (its own equality with spandrel is tests/export/test_upscalers.py's).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tests.conftest import HAS_TORCH
from tests.runtime.test_upscalers import a1111_builtin, random_image
from tests.serving.conftest import detail_text, needs_server

pytestmark = needs_server


def b64_png(image: Image.Image, text: dict | None = None) -> str:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decoded(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def a1111_extras(image: Image.Image, mode: int, by: float, w: int, h: int, crop: bool, first: str, second=None, vis=0):
    """ScriptPostprocessingUpscale.process/upscale with built-in upscalers: (image, info text)."""
    info = {}

    def upscale(name):
        scale = max(w / image.width, h / image.height) if mode == 1 else by
        if mode == 1:
            info["Postprocess upscale to"] = f"{w}x{h}"
        else:
            info["Postprocess upscale by"] = by
        out = a1111_builtin(name, image, scale)
        if mode == 1 and crop:
            canvas = Image.new("RGB", (w, h))
            canvas.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
            out = canvas
            info["Postprocess crop to"] = f"{out.width}x{out.height}"
        return out

    result = upscale(first)
    info["Postprocess upscaler"] = first
    if second and vis > 0:
        result = Image.blend(result, upscale(second), vis)
        info["Postprocess upscaler 2"] = second
    text = ", ".join(f"{k}: {v}" for k, v in info.items())
    return result, text


def test_single_image_scale_by_keeps_the_parameters(client):
    image = random_image(40, 24)
    body = {"image": b64_png(image, {"parameters": "a cat\nSteps: 3, Seed: 1"}), "upscaler_1": "Lanczos"}
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 200, response.text
    out = decoded(response.json()["image"])
    expected, text = a1111_extras(image, 0, 2, 0, 0, False, "Lanczos")  # A1111's default, 2 (not validated: an int)
    assert text == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(expected))
    assert out.info["postprocessing"] == text and out.info["parameters"] == "a cat\nSteps: 3, Seed: 1"
    assert response.json()["html_info"] == f"<p>{text}</p>"


def test_scale_to_with_crop_and_a_second_upscaler(client):
    image = random_image(40, 24)
    body = {"image": b64_png(image), "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 56,
            "upscaler_1": "Lanczos", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.3}  # fmt: skip
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 200, response.text
    out = decoded(response.json()["image"])
    expected, text = a1111_extras(image, 1, 0, 64, 56, True, "Lanczos", "Nearest", 0.3)
    assert out.size == (64, 56) and np.array_equal(np.asarray(out.convert("RGB")), np.asarray(expected))
    assert out.info["postprocessing"] == text and "Postprocess upscaler 2: Nearest" in text
    body.update(upscaling_crop=False, upscaler_2="None")  # no crop: the upscaler's own size, covering 64x56
    out = decoded(client.post("/sdapi/v1/extra-single-image", json=body).json()["image"])
    expected, _ = a1111_extras(image, 1, 0, 64, 56, False, "Lanczos")
    assert out.size == expected.size == (88, 56) and np.array_equal(np.asarray(out), np.asarray(expected))


def test_batch_images_and_none(client):
    images = [random_image(16, 24), random_image(24, 16).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    body = {"imageList": [{"data": b64_png(im), "name": f"{i}.png"} for i, im in enumerate(images)],
            "upscaler_1": "Nearest", "upscaling_resize": 3}  # fmt: skip
    response = client.post("/sdapi/v1/extra-batch-images", json=body)
    assert response.status_code == 200, response.text
    outs = [decoded(data) for data in response.json()["images"]]
    for image, out in zip(images, outs):
        expected, _ = a1111_extras(image, 0, 3, 0, 0, False, "Nearest")
        assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(expected))
    assert response.json()["html_info"] == "<p>Postprocess upscale by: 3.0, Postprocess upscaler: Nearest</p>"
    body["upscaler_1"] = "None"  # A1111: no upscale, the image as sent, no info
    outs = [decoded(d) for d in client.post("/sdapi/v1/extra-batch-images", json=body).json()["images"]]
    assert [np.array_equal(np.asarray(o.convert("RGB")), np.asarray(i)) for o, i in zip(outs, images)] == [True] * 2


@pytest.mark.parametrize(
    "fields,status,message",
    [
        ({"upscaler_1": "R-ESRGAN 4x+"}, 422, "unknown upscaler 'R-ESRGAN 4x+'"),
        ({"upscaler_1": "Lanczos", "upscaler_2": "nope", "extras_upscaler_2_visibility": 0}, 422, "unknown upscaler"),
        ({"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, 422, "gfpgan_visibility"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 9}, 422, "upscaling_resize"),
        ({"upscaler_1": "Lanczos", "resize_mode": 2}, 422, "resize_mode"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 8, "big": True}, 422, "more than"),  # checked before work
        ({"upscaler_1": "Lanczos", "image": "not base64!"}, 422, "not valid base64"),
        ({"upscaler_1": "Lanczos", "image": ""}, 422, "image not selected"),
    ],
)
def test_bad_extras_requests_are_422(client, fields, status, message):
    fields = dict(fields)
    size = 600 if fields.pop("big", False) else 16  # 600 * 8 = 4800 px a side: over the 4096^2 pixel limit
    body = {"image": b64_png(Image.new("RGB", (size, size))), **fields}
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == status and message in detail_text(response), response.text


@pytest.fixture
def upscaler_folder(tmp_path, tiny_model):
    """A random-weight compact (SRVGG) 2x model saved as an upscaler file, in the served model's upscaler folder."""
    if not HAS_TORCH:
        pytest.skip("exporting an upscaler model needs torch (export extras)")
    try:
        from export.upscalers import import_spandrel

        import_spandrel()
    except Exception as exc:
        pytest.skip(f"spandrel is not installed ({exc})")
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    save_file(Compact(num_feat=8, num_conv=2, upscale=2).state_dict(), tmp_path / "compact-2x.safetensors")
    before = tiny_model.upscaler_dir
    tiny_model.upscaler_dir = tmp_path
    yield tmp_path
    tiny_model.upscaler_dir = before
    tiny_model.upscalers.clear()


def test_model_upscaler_listed_and_used(client, upscaler_folder):
    from runtime.upscalers import load_upscaler

    listing = client.get("/sdapi/v1/upscalers").json()
    assert [item["name"] for item in listing] == ["None", "Lanczos", "Nearest", "compact-2x"]
    assert listing[3]["model_path"] == str(upscaler_folder / "compact-2x.safetensors")
    image = random_image(24, 16)
    body = {"image": b64_png(image), "upscaler_1": "compact-2x", "upscaling_resize": 3}
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 200, response.text
    expected = load_upscaler("compact-2x", upscaler_folder).upscale(image, 3.0)  # two model passes, then Lanczos
    out = decoded(response.json()["image"])
    assert out.size == (72, 48) and np.array_equal(np.asarray(out.convert("RGB")), np.asarray(expected))


def test_a_corrupt_upscaler_file_is_a_422(client, upscaler_folder):
    (upscaler_folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    body = {"image": b64_png(random_image(16, 16)), "upscaler_1": "broken"}
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 422 and "broken.safetensors" in detail_text(response), response.text
    assert client.post("/sdapi/v1/extra-single-image", json=dict(body, upscaler_1="Lanczos")).status_code == 200


def test_hires_fix_with_a_model_upscaler_as_by_hand(client, tiny_model, upscaler_folder):
    """hr_upscaler naming an upscaler file: A1111's second pass input is the first pass's image (truncated to uint8)
    through images.resize_image with that upscaler (model passes, then Lanczos), then img2img from a fresh stream."""
    from runtime.pipelines.hires import hires_schedule
    from runtime.upscalers import load_upscaler, resize_image

    size, prompt = 32, "a photo of a cat"
    body = {"prompt": prompt, "seed": 42, "steps": 3, "cfg_scale": 6.0, "width": size, "height": size,
            "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2, "hr_upscaler": "compact-2x",
            "hr_second_pass_steps": 2, "denoising_strength": 0.5}  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    image = np.asarray(decoded(response.json()["images"][0]).convert("RGB"))
    options = dict(seed=42, cfg_scale=6.0, sampler="Euler")
    first = tiny_model.txt2img(prompt, steps=3, width=size, height=size, **options).images[0]
    upscaler = load_upscaler("compact-2x", upscaler_folder)
    resized = resize_image(upscaler, Image.fromarray((np.float32(255) * first).astype(np.uint8)), 2 * size, 2 * size)
    total, start = hires_schedule(2, 0.5)
    second = tiny_model.img2img(prompt, resized, steps=total, strength=(2 + 0.5) / total, **options)
    assert second.request.steps - int(total * second.request.strength) == start
    expected = np.clip(np.round(second.images[0] * 255), 0, 255)
    assert np.abs(image.astype(np.float64) - expected).max() <= 1
    assert "Hires upscaler: compact-2x" in decoded(response.json()["images"][0]).info["parameters"]

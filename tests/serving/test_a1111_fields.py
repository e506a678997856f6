"""Every A1111 txt2img/img2img field is honoured or refused by name, and bad input is a 4xx, never a 500.

References: diffusers (variation seeds: A1111's slerp of torch noises, transcribed here from modules/rng.py, given to
StableDiffusionPipeline as `latents`; initial_noise_multiplier: StableDiffusionImg2ImgPipeline with its noise scaled),
OpenCV (mask_blur_x/y, as A1111 blurs), StableDiffusion's own methods for what the HTTP fields map to, and A1111's
documented rules (styles, settings, infotext keys) written out in the tests.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from runtime.output import to_uint8
from tests.conftest import needs_torch
from tests.serving.conftest import SIZE, detail_text, needs_server

pytestmark = [needs_torch, needs_server]

BODY = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "seed": 42, "steps": 3, "cfg_scale": 6.0,
        "width": SIZE, "height": SIZE, "sampler_name": "Euler"}  # fmt: skip
API = dict(negative_prompt="blurry", seed=42, steps=3, cfg_scale=6.0, width=SIZE, height=SIZE, sampler="Euler")


def _b64_png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _decode(data: dict) -> tuple[list[np.ndarray], list[str]]:
    images, texts = [], []
    for b64 in data["images"]:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
            images.append(np.asarray(image.convert("RGB")))
            texts.append(image.info["parameters"])
    return images, texts


def _post(client, route: str, body: dict) -> tuple[list[np.ndarray], list[str], dict]:
    response = client.post(f"/sdapi/v1/{route}", json=body)
    assert response.status_code == 200, response.text
    images, texts = _decode(response.json())
    return images, texts, json.loads(response.json()["info"])


def assert_parity(images: np.ndarray, reference: np.ndarray) -> None:
    """The txt2img parity bound (tests/runtime/test_txt2img_parity.py) on float images in [0, 1]."""
    diff = np.abs(images.astype(np.float64) - reference.astype(np.float64))
    assert diff.mean() <= 2e-5 and diff.max() <= 1e-3, f"mean {diff.mean():.2e}, max {diff.max():.2e}"
    assert reference.std() > 0.01


def _init_and_mask() -> tuple[np.ndarray, np.ndarray]:
    init = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 6:20] = 255
    return init, mask


# ---- no 500 for bad input ----------------------------------------------------------------------------------------


def test_bad_input_is_4xx_on_one_keep_alive_connection(server):
    """Each of these crashed the server before; now each is a 4xx, and the same connection serves the next."""
    thin = _b64_png(np.full((4, 4000, 3), 128, np.uint8))  # 4000x4
    cases = [
        ("txt2img", dict(BODY, enable_hr=True, hr_scale=1e308), "hires scale"),
        ("txt2img", dict(BODY, prompt="\ud800"), "prompt is not valid Unicode"),
        ("img2img", dict(BODY, init_images=[thin], resize_mode=2), "a 4000x4 image scaled to fit 32x32"),
    ]
    host = urllib.parse.urlsplit(server[0])
    connection = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    try:
        for route, body, message in cases:
            connection.request("POST", f"/sdapi/v1/{route}", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            detail = json.loads(response.read())["detail"]  # FastAPI's and A1111's 422: [{loc, msg, type}]
            assert response.status == 422 and message in detail[0]["msg"], (route, response.status, detail)
            assert set(detail[0]) == {"loc", "msg", "type"} and detail[0]["loc"][0] == "body"
            sock = connection.sock
            connection.request("GET", "/sdapi/v1/options")  # the same socket: not closed after the error
            answer = connection.getresponse()
            assert answer.status == 200 and json.loads(answer.read())["sd_model_checkpoint"]
            assert connection.sock is sock
    finally:
        connection.close()


def test_missing_lora_warns_and_disabled_networks_ignore_tags(client, tiny_model):
    """A1111 generates without a LoRA it cannot find (warning "Networks not found"); disable_extra_networks drops
    every tag. Both images equal the prompt without the tag."""
    plain = tiny_model.txt2img(BODY["prompt"], **API)
    images, _, info = _post(client, "txt2img", dict(BODY, prompt=BODY["prompt"] + " <lora:nowhere:1>"))
    assert np.array_equal(images[0], to_uint8(plain.images[0]))
    assert "Networks not found: nowhere" in info["comments"]
    images, _, info = _post(client, "txt2img", dict(BODY, prompt=BODY["prompt"] + " <lora:x:1>",
                                                    disable_extra_networks=True))  # fmt: skip
    assert np.array_equal(images[0], to_uint8(plain.images[0])) and not info["comments"]


# ---- refused by name, and null means the default -----------------------------------------------------------------

REFUSED = [
    ("txt2img", {"restore_faces": True}, "restore_faces"),
    ("txt2img", {"tiling": True}, "tiling"),
    ("txt2img", {"s_min_uncond": 0.5}, "s_min_uncond"),
    ("txt2img", {"s_churn": 1.0, "sampler_name": "DPM++ 2M"}, "s_churn does not apply to the DPM++ 2M sampler"),
    ("txt2img", {"s_noise": 0.9, "sampler_name": "DDIM"}, "s_noise does not apply to the DDIM sampler"),
    ("txt2img", {"refiner_checkpoint": "sdxl_refiner.safetensors"}, "refiner_checkpoint"),
    ("txt2img", {"script_name": "x/y/z plot"}, "script_name"),
    ("txt2img", {"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts.ControlNet"),
    ("txt2img", {"infotext": "a cat\nSteps: 3"}, "infotext"),
    ("txt2img", {"firstphase_width": 256}, "firstphase_width"),
    ("txt2img", {"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),
    ("txt2img", {"enable_hr": True, "hr_sampler_name": "Nope"}, "unknown sampler 'Nope'"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "other [0123456789]"}}, "sd_model_checkpoint"),
    ("txt2img", {"override_settings": {"img2img_color_correction": True}}, "img2img_color_correction"),
    ("txt2img", {"styles": ["no such style"]}, "unknown style 'no such style'"),
    ("img2img", {"init_images": ["A", "B"]}, "init_images"),
    ("img2img", {"mask": "MASK", "mask_round": False}, "mask_round"),
    ("img2img", {"latent_mask": "MASK"}, "latent_mask"),
    ("img2img", {"mask": "MASK", "inpainting_fill": 4}, "inpainting_fill"),
]


def test_unsupported_fields_are_refused_by_name(client):
    init = _b64_png(np.zeros((SIZE, SIZE, 3), np.uint8))
    for route, fields, name in REFUSED:
        body = dict(BODY, **fields)
        if route == "img2img":
            body["init_images"] = [init if image == "A" else image for image in body.get("init_images", ["A"])]
            body.update({k: init for k, v in fields.items() if v == "MASK"})
        response = client.post(f"/sdapi/v1/{route}", json=body)
        assert response.status_code == 422 and name in detail_text(response), (fields, response.text)
        if name in fields or name.startswith("alwayson_scripts"):  # refused by name: loc says which field
            assert response.json()["detail"][0]["loc"] == ["body", *name.split(".")], response.text


def test_null_fields_mean_their_defaults(client, tiny_model):
    nulls = {"styles": None, "subseed": None, "subseed_strength": None, "seed_resize_from_h": None,
             "restore_faces": None, "tiling": None, "s_churn": None, "s_min_uncond": None, "batch_size": None,
             "n_iter": None, "override_settings": None, "script_name": None, "alwayson_scripts": None,
             "enable_hr": None, "hr_prompt": None, "hr_sampler_name": None, "send_images": None}  # fmt: skip
    images, _, _ = _post(client, "txt2img", dict(BODY, **nulls))
    assert np.array_equal(images[0], to_uint8(tiny_model.txt2img(BODY["prompt"], **API).images[0]))


# ---- settings: POST /options and override_settings ---------------------------------------------------------------


def test_options_stick_and_override_settings_apply(client, tiny_model):
    clip2 = tiny_model.txt2img(BODY["prompt"], clip_skip=2, **API)
    clip1 = tiny_model.txt2img(BODY["prompt"], **API)
    assert not np.array_equal(to_uint8(clip1.images), to_uint8(clip2.images))
    try:
        assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        images, texts, _ = _post(client, "txt2img", BODY)
        assert np.array_equal(images[0], to_uint8(clip2.images[0])) and "Clip skip: 2" in texts[0]
        override = {"override_settings": {"CLIP_stop_at_last_layers": 1}}  # restored afterwards by default
        images, texts, _ = _post(client, "txt2img", dict(BODY, **override))
        assert np.array_equal(images[0], to_uint8(clip1.images[0])) and "Clip skip" not in texts[0]
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        _post(client, "txt2img", dict(BODY, **override, override_settings_restore_afterwards=False))
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # kept, as A1111 does
        refused = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "sd_hypernetwork": "x"})
        assert refused.status_code == 422 and "sd_hypernetwork" in detail_text(refused)
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # nothing applied
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})


# ---- variation seeds ---------------------------------------------------------------------------------------------


def a1111_slerp(val, low, high):
    """A1111 modules/rng.py slerp, as written there (norms along dim 1 of a [C, h, w] tensor)."""
    import torch

    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def a1111_noise(seed, subseed, strength, shape, from_shape):
    """A1111's ImageRNG.first for one image, with torch CPU generators: noise at from_shape from a fresh seed,
    slerped to the subseed's, pasted centred into the image stream's noise (cropped where larger)."""
    import torch

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    noise = torch.randn(from_shape, generator=torch.Generator().manual_seed(seed))
    noise = a1111_slerp(strength, noise, torch.randn(from_shape, generator=torch.Generator().manual_seed(subseed)))
    dx, dy = (shape[2] - from_shape[2]) // 2, (shape[1] - from_shape[1]) // 2
    w = from_shape[2] if dx >= 0 else from_shape[2] + 2 * dx
    h = from_shape[1] if dy >= 0 else from_shape[1] + 2 * dy
    tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    x[:, ty : ty + h, tx : tx + w] = noise[:, dy : dy + h, dx : dx + w]
    return x


def test_variation_seed_matches_diffusers_with_a1111_noise(client, tiny_model, tiny_sd1):
    import diffusers
    import torch

    scale = tiny_model.info["vae_scale_factor"]
    shape = (4, SIZE // scale, SIZE // scale)
    from_w, from_h = 40, 20  # wider than the image (cropped), lower (pasted in the middle)
    body = dict(BODY, batch_size=2, subseed=777, subseed_strength=0.3, seed_resize_from_w=from_w,
                seed_resize_from_h=from_h)  # fmt: skip
    images, texts, info = _post(client, "txt2img", body)
    result = tiny_model.txt2img(BODY["prompt"], batch_size=2, subseed=777, subseed_strength=0.3,
                                seed_resize_from=(from_w, from_h), **API)  # fmt: skip
    assert np.array_equal(np.stack(images), to_uint8(result.images))
    latents = torch.stack([a1111_noise(42 + i, 777 + i, 0.3, shape, (4, from_h // scale, from_w // scale))
                           for i in range(2)])  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(BODY["prompt"], negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0,
                     num_images_per_prompt=2, height=SIZE, width=SIZE, latents=latents, output_type="np").images
    assert_parity(result.images, reference)
    plain = tiny_model.txt2img(BODY["prompt"], batch_size=2, **API)
    assert np.abs(result.images - plain.images).mean() > 0.01  # the variation changed the images
    assert info["all_subseeds"] == [777, 778] and info["subseed_strength"] == 0.3
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (from_w, from_h)
    assert "Variation seed: 778, Variation seed strength: 0.3, Seed resize from: 40x20" in texts[1]


# ---- hires fix fields, sampler options ---------------------------------------------------------------------------


def test_hires_prompt_and_sampler_as_by_hand(client, tiny_model):
    """hr_prompt/hr_negative_prompt/hr_sampler_name/hr_scheduler run the second pass: it equals txt2img, A1111's
    Lanczos input (truncated to uint8, resized) and img2img with those settings and a fresh stream."""
    from runtime.pipelines.hires import hires_schedule

    hires = dict(enable_hr=True, hr_scale=2, hr_upscaler="Lanczos", hr_second_pass_steps=2, denoising_strength=0.5,
                 hr_prompt="a dog", hr_negative_prompt="dark", hr_sampler_name="DPM++ 2M", hr_scheduler="karras")
    images, texts, _ = _post(client, "txt2img", dict(BODY, **hires))
    first = tiny_model.txt2img(BODY["prompt"], **API).images[0]
    resized = Image.fromarray((np.float32(255) * first).astype(np.uint8)).resize((2 * SIZE, 2 * SIZE),
                                                                                 Image.Resampling.LANCZOS)
    total, start = hires_schedule(2, 0.5)
    second = tiny_model.img2img("a dog", resized, negative_prompt="dark", steps=total, strength=(2 + 0.5) / total,
                                cfg_scale=6.0, seed=42, sampler="DPM++ 2M", schedule="Karras")  # fmt: skip
    assert second.request.steps - int(total * second.request.strength) == start
    assert np.abs(images[0].astype(np.float64) - to_uint8(second.images[0])).max() <= 1
    for entry in ("Hires prompt: a dog", "Hires negative prompt: dark", "Hires sampler: DPM++ 2M",
                  "Hires schedule type: Karras"):  # fmt: skip
        assert entry in texts[0]


def test_sampler_options_reach_the_sampler(client, tiny_model):
    options = dict(s_churn=1.0, s_tmin=0.0, s_noise=0.9)
    images, texts, _ = _post(client, "txt2img", dict(BODY, **options, s_tmax=0))  # 0: no upper bound (A1111)
    reference = tiny_model.txt2img(BODY["prompt"], **options, **API)
    assert np.array_equal(images[0], to_uint8(reference.images[0]))
    assert not np.array_equal(images[0], to_uint8(tiny_model.txt2img(BODY["prompt"], **API).images[0]))
    assert "Sigma churn: 1.0" in texts[0] and "Sigma noise: 0.9" in texts[0]


def test_eta_reaches_ancestral_samplers_and_ddim(client, tiny_model):
    """A1111 gives eta to the samplers that take one: its default is eta_ancestral (1) for the ancestral ones and
    eta_ddim (0) for DDIM, and the infotext names it ("Eta", "Eta DDIM") only away from that default."""
    ancestral = dict(API, sampler="Euler a")
    images, texts, _ = _post(client, "txt2img", dict(BODY, sampler_name="Euler a", eta=0.5))
    assert np.array_equal(images[0], to_uint8(tiny_model.txt2img(BODY["prompt"], eta=0.5, **ancestral).images[0]))
    default = to_uint8(tiny_model.txt2img(BODY["prompt"], **ancestral).images[0])
    assert not np.array_equal(images[0], default) and "Eta: 0.5" in texts[0]
    override = {"override_settings": {"eta_ancestral": 0.5}}  # the setting, when the body gives none
    images, texts, _ = _post(client, "txt2img", dict(BODY, sampler_name="Euler a", **override))
    assert np.array_equal(images[0], to_uint8(tiny_model.txt2img(BODY["prompt"], eta=0.5, **ancestral).images[0]))
    images, texts, _ = _post(client, "txt2img", dict(BODY, sampler_name="Euler a", eta=1.0))
    assert np.array_equal(images[0], default) and "Eta" not in texts[0]
    images, texts, _ = _post(client, "txt2img", dict(BODY, sampler_name="DDIM", eta=0.3))
    ddim = tiny_model.txt2img(BODY["prompt"], eta=0.3, **dict(API, sampler="DDIM"))
    assert np.array_equal(images[0], to_uint8(ddim.images[0])) and "Eta DDIM: 0.3" in texts[0]
    images, texts, _ = _post(client, "txt2img", dict(BODY, eta=0.5))  # Euler takes no eta: ignored, as in A1111
    assert np.array_equal(images[0], to_uint8(tiny_model.txt2img(BODY["prompt"], **API).images[0]))


# ---- img2img and inpaint fields ----------------------------------------------------------------------------------


def test_initial_noise_multiplier_matches_diffusers(client, tiny_model, tiny_sd1, monkeypatch):
    """A1111 scales img2img's initial noise: diffusers' img2img with its noise draw scaled the same gives the image."""
    import diffusers
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    init, _ = _init_and_mask()
    body = dict(BODY, init_images=[_b64_png(init)], denoising_strength=0.6, initial_noise_multiplier=0.7)
    images, texts, _ = _post(client, "img2img", body)
    result = tiny_model.img2img(BODY["prompt"], Image.fromarray(init), strength=0.6, noise_multiplier=0.7, **API)
    assert np.array_equal(images[0], to_uint8(result.images[0]))
    draw = module.randn_tensor
    monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: 0.7 * draw(*args, **kwargs))
    import torch

    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(BODY["prompt"], image=Image.fromarray(init), negative_prompt="blurry", strength=0.6,
                     num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator().manual_seed(42),
                     output_type="np").images[0]  # fmt: skip
    assert_parity(result.images[0], reference)
    plain = tiny_model.img2img(BODY["prompt"], Image.fromarray(init), strength=0.6, **API).images[0]
    assert np.abs(result.images[0] - plain).mean() > 0.005 and "Noise multiplier: 0.7" in texts[0]


def test_mask_blur_x_y_and_inpainting_fill(client, tiny_model):
    init, mask = _init_and_mask()
    body = dict(BODY, init_images=[_b64_png(init)], mask=_b64_png(mask), denoising_strength=0.6,
                inpaint_full_res=False, mask_blur_x=1, mask_blur_y=5)  # fmt: skip
    api = dict(API, strength=0.6, mask_blur=1, mask_blur_y=5)
    results = {}
    for fill, name in enumerate(("fill", "original", "latent noise", "latent nothing")):
        images, texts, _ = _post(client, "img2img", dict(body, inpainting_fill=fill))
        reference = tiny_model.inpaint(BODY["prompt"], Image.fromarray(init), Image.fromarray(mask),
                                       inpainting_fill=name, **api)  # fmt: skip
        assert np.array_equal(images[0], to_uint8(reference.images[0])), name
        assert "Mask blur x: 1, Mask blur y: 5" in texts[0]
        assert ("Masked content" in texts[0]) == (name != "original")
        results[name] = images[0]
    assert len({r.tobytes() for r in results.values()}) == 4  # each fill gives another image


def test_inpainting_fill_latents_as_a1111():
    """A1111: latent noise = init * mask + randn(seed + i) * nmask; latent nothing = init * mask (mask: keep)."""
    import torch

    from runtime.pipelines.inpaint import fill_latents

    latents = np.random.default_rng(1).standard_normal((2, 4, 6, 5)).astype(np.float32)
    repaint = np.zeros((1, 1, 6, 5), np.float32)
    repaint[..., 1:4, 2:] = 1
    keep = 1 - repaint
    noise = np.stack([torch.randn((4, 6, 5), generator=torch.Generator().manual_seed(9 + i)).numpy() for i in (0, 1)])
    expected = latents * keep + noise * repaint  # torch's noise, which runtime.rng reproduces to ~2.4e-7
    np.testing.assert_allclose(fill_latents("latent noise", latents, repaint, 9), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(fill_latents("latent nothing", latents, repaint, 9), latents * keep)
    np.testing.assert_array_equal(fill_latents("original", latents, repaint, 9), latents)


@pytest.mark.parametrize(("blur_x", "blur_y"), [(1, 5), (4, 0)])
def test_mask_blur_x_y_equals_opencv(blur_x, blur_y):
    """A1111 blurs x with a (k, 1) kernel of sigma mask_blur_x, then y with (1, k) of mask_blur_y."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (A1111's blur) not installed")
    from runtime.images import blur_mask

    _, mask = _init_and_mask()
    expected = mask
    for sigma, size in ((blur_x, lambda k: (k, 1)), (blur_y, lambda k: (1, k))):
        if sigma > 0:
            expected = cv2.GaussianBlur(expected, size(2 * int(2.5 * sigma + 0.5) + 1), sigma)
    assert np.array_equal(np.asarray(blur_mask(Image.fromarray(mask), blur_x, blur_y)), expected)


# ---- styles and images -------------------------------------------------------------------------------------------


def test_styles_csv_and_requests(client, server, tiny_model, tmp_path, monkeypatch):
    from runtime.styles import read_styles_csv

    csv_file = tmp_path / "styles.csv"
    csv_file.write_text('name,prompt,negative_prompt\n"oil","{prompt}, oil painting, dark","ugly"\n'
                        "# old,ignored,\nsharp,detailed,\n", encoding="utf-8")  # fmt: skip
    styles = read_styles_csv(csv_file)
    assert [s["name"] for s in styles] == ["oil", "sharp"]
    monkeypatch.setattr(server[1].state, "styles", list(styles))
    assert [s["name"] for s in client.get("/sdapi/v1/prompt-styles").json()] == ["oil", "sharp"]
    images, _, info = _post(client, "txt2img", dict(BODY, styles=["oil", "sharp"]))
    # A1111: "{prompt}" is replaced; otherwise ", " joins the prompt and the style's text; styles in order
    prompt, negative = "a photo of a cat, oil painting, dark, detailed", "blurry, ugly"
    assert (info["prompt"], info["negative_prompt"]) == (prompt, negative)
    reference = tiny_model.txt2img(prompt, **dict(API, negative_prompt=negative))
    assert np.array_equal(images[0], to_uint8(reference.images[0]))


def test_base64_line_breaks_spaces_and_data_urls(client, tiny_model):
    init, _ = _init_and_mask()
    b64 = _b64_png(init)
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME line breaks, as some clients send
    body = dict(BODY, init_images=[f"data:image/png;base64, {wrapped}\r\n"], denoising_strength=0.5)
    images, _, _ = _post(client, "img2img", body)
    reference = tiny_model.img2img(BODY["prompt"], Image.fromarray(init), strength=0.5, **API)
    assert np.array_equal(images[0], to_uint8(reference.images[0]))

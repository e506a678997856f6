"""The HTTP server on loopback with a real client: every route, A1111's field names, PNG metadata, the CLI's image.

References: StableDiffusion's own methods called directly (the images), `python cli.py txt2img` (the same image
and infotext as a file), Pillow (PNG chunks), prometheus_client's parser (the metrics text).
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.output import to_uint8
from tests.conftest import needs_torch
from tests.serving.conftest import SIZE, detail_text, needs_server

pytestmark = [needs_torch, needs_server]

BODY = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "seed": 42, "steps": 3, "cfg_scale": 6.0,
        "width": SIZE, "height": SIZE, "sampler_name": "Euler a"}  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]


def _pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))


def _png_text(b64: str) -> str:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return image.info["parameters"]


def _b64_png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_txt2img_fields_images_and_info(client, tiny_model):
    body = dict(BODY, batch_size=2, n_iter=2, override_settings={"sd_vae": "Automatic"}, alwayson_scripts={},
                styles=[], send_images=True, save_images=False, an_unknown_field=1)  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert set(data) == {"images", "parameters", "info"}
    info = json.loads(data["info"])  # a JSON string, as A1111 sends it
    assert info["all_seeds"] == [42, 43, 44, 45] and info["seed"] == 42
    assert info["all_prompts"] == [BODY["prompt"]] * 4 and info["negative_prompt"] == "blurry"
    assert (info["width"], info["height"], info["steps"], info["sampler_name"]) == (SIZE, SIZE, 3, "Euler a")
    assert data["parameters"]["n_iter"] == 2 and data["parameters"]["seed"] == 42
    reference = tiny_model.txt2img(BODY["prompt"], negative_prompt="blurry", seed=42, batch_size=4, steps=3,
                                   cfg_scale=6.0, width=SIZE, height=SIZE, sampler="Euler a")  # fmt: skip
    assert len(data["images"]) == 4
    for i, b64 in enumerate(data["images"]):
        assert np.array_equal(_pixels(b64), to_uint8(reference.images[i]))
        assert _png_text(b64) == reference.infotexts[i] == info["infotexts"][i]


def test_send_images_false_and_random_seed(client):
    data = client.post("/sdapi/v1/txt2img", json=dict(BODY, seed=-1, send_images=False)).json()
    assert data["images"] == []
    info = json.loads(data["info"])
    assert info["seed"] >= 0 and f"Seed: {info['seed']}," in info["infotexts"][0]


def test_png_info_round_trip(client):
    image = client.post("/sdapi/v1/txt2img", json=BODY).json()["images"][0]
    data = client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert data["info"] == _png_text(image)
    params = data["parameters"]
    assert params["Prompt"] == BODY["prompt"] and params["Negative prompt"] == "blurry"
    assert (params["Steps"], params["Seed"], params["Sampler"], params["Size"]) == ("3", "42", "Euler a", "32x32")
    plain = client.post("/sdapi/v1/png-info", json={"image": _b64_png(np.zeros((8, 8, 3), np.uint8))}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}


@pytest.mark.slow
def test_image_equals_the_cli(client, tiny_sd1, serving_engines, tmp_path):
    out = tmp_path / "cli.png"
    argv = [sys.executable, str(ROOT / "cli.py"), "--quiet", "txt2img", "--model", str(tiny_sd1), "--engines",
            str(serving_engines), "--prompt", BODY["prompt"], "--negative-prompt", "blurry", "--seed", "42",
            "--steps", "3", "--cfg-scale", "6", "--width", str(SIZE), "--height", str(SIZE), "--sampler", "Euler a",
            "--output", str(out)]  # fmt: skip
    subprocess.run(argv, check=True, cwd=ROOT, capture_output=True, timeout=300)
    image = client.post("/sdapi/v1/txt2img", json=BODY).json()["images"][0]
    with Image.open(out) as cli_image:
        assert np.array_equal(_pixels(image), np.asarray(cli_image.convert("RGB")))
        assert _png_text(image) == cli_image.info["parameters"]


def test_img2img_and_inpaint_equal_the_api(client, tiny_model):
    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[8:24, 8:24] = 255
    options = dict(seed=7, steps=3, cfg_scale=6.0, width=SIZE, height=SIZE, sampler="Euler a")
    body = dict(BODY, seed=7, init_images=[_b64_png(init)], denoising_strength=0.6, resize_mode=0)
    data = client.post("/sdapi/v1/img2img", json=body).json()
    reference = tiny_model.img2img(BODY["prompt"], Image.fromarray(init), negative_prompt="blurry", strength=0.6,
                                   **options)  # fmt: skip
    assert np.array_equal(_pixels(data["images"][0]), to_uint8(reference.images[0]))
    assert data["parameters"]["init_images"] is None  # not echoed back, as in A1111
    assert json.loads(data["info"])["denoising_strength"] == 0.6

    inpaint = dict(body, mask=_b64_png(mask), mask_blur=2, inpaint_full_res=False, inpainting_mask_invert=1,
                   inpainting_fill=1)  # 1: the original content under the mask, as the API's default
    data = client.post("/sdapi/v1/img2img", json=inpaint).json()
    reference = tiny_model.inpaint(BODY["prompt"], Image.fromarray(init), Image.fromarray(255 - mask),
                                   negative_prompt="blurry", strength=0.6, mask_blur=2, **options)  # fmt: skip
    assert np.array_equal(_pixels(data["images"][0]), to_uint8(reference.images[0]))
    assert "Mask blur: 2" in _png_text(data["images"][0])


def test_listing_routes(client, tiny_model):
    from runtime.samplers import SAMPLER_NAMES

    samplers = client.get("/sdapi/v1/samplers").json()
    assert [s["name"] for s in samplers] == list(SAMPLER_NAMES)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"automatic", "karras", "exponential"} <= {s["name"] for s in schedulers}
    assert all({"name", "label", "aliases", "default_rho", "need_inner_model"} == set(s) for s in schedulers)
    by_name = {s["name"]: s for s in schedulers}  # A1111 1.10's table (modules/sd_schedulers.py)
    names = {"automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
             "align_your_steps", "simple", "normal", "ddim", "beta"}  # fmt: skip
    assert set(by_name) == names
    assert by_name["karras"]["default_rho"] == 7.0 and by_name["polyexponential"]["default_rho"] == 1.0
    assert by_name["sgm_uniform"]["aliases"] == ["SGMUniform"] and by_name["sgm_uniform"]["need_inner_model"]
    euler_a = next(s for s in samplers if s["name"] == "Euler a")
    assert euler_a["aliases"] == ["k_euler_a", "k_euler_ancestral"]  # A1111's aliases
    body = dict(BODY, steps=1, cfg_scale=1, sampler_name="Euler a", scheduler="SGMUniform", send_images=False)
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200  # an A1111 alias is a scheduler
    models = client.get("/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == tiny_model.name and models[0]["hash"] == tiny_model.key.rsplit("-", 1)[-1]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == "onnxruntime"
    schema = client.get("/openapi.json").json()
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info", "/sdapi/v1/progress"):
        assert route in schema["paths"]
    txt2img_fields = schema["components"]["schemas"]["Txt2ImgBody"]["properties"]
    assert {"sampler_name", "scheduler", "n_iter", "batch_size", "enable_hr", "send_images"} <= set(txt2img_fields)


def test_scheduler_field_selects_the_schedule(client, tiny_model):
    body = dict(BODY, sampler_name="DPM++ 2M", scheduler="karras")
    data = client.post("/sdapi/v1/txt2img", json=body).json()
    reference = tiny_model.txt2img(BODY["prompt"], negative_prompt="blurry", seed=42, steps=3, cfg_scale=6.0,
                                   width=SIZE, height=SIZE, sampler="DPM++ 2M Karras")  # fmt: skip
    assert np.array_equal(_pixels(data["images"][0]), to_uint8(reference.images[0]))
    assert "Schedule type: Karras" in _png_text(data["images"][0])


def test_progress_and_metrics(client):
    from prometheus_client.parser import text_string_to_metric_families

    progress = client.get("/sdapi/v1/progress").json()
    assert set(progress) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert {"sampling_step", "sampling_steps", "job_count", "interrupted"} <= set(progress["state"])
    assert client.post("/sdapi/v1/interrupt").status_code == 200  # nothing running: a no-op
    before = client.get("/metrics").text
    client.post("/sdapi/v1/txt2img", json=BODY)
    client.post("/sdapi/v1/txt2img", json=dict(BODY, steps="many"))
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}

    def requests_of(text_or_families, status):
        fams = text_or_families if isinstance(text_or_families, dict) else {
            f.name: f for f in text_string_to_metric_families(text_or_families)}  # fmt: skip
        return sum(s.value for s in fams["sdrt_requests"].samples if s.labels.get("route") == "/sdapi/v1/txt2img"
                   and s.labels.get("status") == status and s.name == "sdrt_requests_total")  # fmt: skip

    assert requests_of(families, "200") == requests_of(before, "200") + 1
    assert requests_of(families, "422") == requests_of(before, "422") + 1
    assert "sdrt_queue_depth" in families and families["sdrt_queue_depth"].type == "gauge"
    latency = families["sdrt_request_latency_seconds"]
    assert latency.type == "histogram"
    counts = [s for s in latency.samples if s.name.endswith("_count") and s.labels["route"] == "/sdapi/v1/txt2img"]
    assert counts and counts[0].value >= 2
    assert "sdrt_request_errors" in families


def test_hires_fix_fields(client, tiny_model):
    body = dict(BODY, enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.5)
    data = client.post("/sdapi/v1/txt2img", json=body).json()
    reference = tiny_model.txt2img(BODY["prompt"], negative_prompt="blurry", seed=42, steps=3, cfg_scale=6.0,
                                   width=SIZE, height=SIZE, sampler="Euler a", hires_scale=2, hires_upscaler="Latent",
                                   hires_steps=2, hires_strength=0.5)  # fmt: skip
    pixels = _pixels(data["images"][0])
    assert pixels.shape == (2 * SIZE, 2 * SIZE, 3)
    assert np.array_equal(pixels, to_uint8(reference.images[0]))
    assert _png_text(data["images"][0]) == reference.infotexts[0]
    bad = client.post("/sdapi/v1/txt2img", json=dict(body, hr_upscaler="ESRGAN_4x"))
    assert bad.status_code == 422 and "ESRGAN_4x" in detail_text(bad)


def test_settings_loras_embeddings_and_upscalers(client, tiny_model, tmp_path, monkeypatch):
    """The listings A1111 clients read first, in A1111's field names (modules/api/models.py); the LoRA listing is the
    folder's .safetensors files by stem (pickles only with allow_pickle), as <lora:name> tags find them."""
    from runtime.pipelines.hires import HIRES_UPSCALERS, LATENT_MODES
    from runtime.prompts.embeddings import EmbeddingDatabase, TextualInversion

    (tmp_path / "style.safetensors").write_bytes(b"x")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "detail.safetensors").write_bytes(b"x")
    (tmp_path / "old.pt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    monkeypatch.setattr(tiny_model, "lora_dir", tmp_path)
    monkeypatch.setattr(tiny_model, "lora_allow_pickle", False)
    loras = client.get("/sdapi/v1/loras").json()
    assert sorted(item["name"] for item in loras) == ["detail", "style"]
    assert all(set(item) == {"name", "alias", "path", "metadata"} for item in loras)
    monkeypatch.setattr(tiny_model, "lora_allow_pickle", True)
    assert "old" in {item["name"] for item in client.get("/sdapi/v1/loras").json()}

    vec = np.zeros((3, tiny_model.info["text_hidden_size"]), np.float32)
    grainy = TextualInversion("grainy", vec, tmp_path / "grainy.safetensors")
    database = EmbeddingDatabase({"grainy": grainy}, {"xl": 1280})
    monkeypatch.setattr(tiny_model, "embeddings", database)
    listed = client.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"]["grainy"]["vectors"] == 3 and listed["loaded"]["grainy"]["shape"] == vec.shape[1]
    assert listed["skipped"]["xl"]["shape"] == 1280
    assert set(listed["loaded"]["grainy"]) == {"step", "sd_checkpoint", "sd_checkpoint_name", "shape", "vectors"}

    upscalers = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    latent = [u["name"] for u in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert upscalers == ["None", "Lanczos", "Nearest"] and latent == list(LATENT_MODES)  # no upscaler files here
    assert set(HIRES_UPSCALERS) <= set(upscalers + latent)  # every hr_upscaler the server takes is listed
    assert client.get("/sdapi/v1/sd-vae").json() == []  # no --vae override

    settings = client.get("/sdapi/v1/options").json()
    title = settings["sd_model_checkpoint"]
    assert title == client.get("/sdapi/v1/sd-models").json()[0]["title"]
    assert title == f"{tiny_model.name} [{settings['sd_checkpoint_hash']}]"
    same = {"sd_model_checkpoint": title, "samples_format": "png"}
    assert client.post("/sdapi/v1/options", json=same).status_code == 200
    assert client.post("/sdapi/v1/options", json={"show_progressbar": True}).status_code == 200
    refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors [0123456789]"})
    assert refused.status_code == 422 and title in detail_text(refused)
    assert client.post("/sdapi/v1/options", json=[1, 2]).status_code == 422

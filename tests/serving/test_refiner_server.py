"""The A1111 refiner fields on the HTTP server: refiner_checkpoint naming the refiner served beside the model
(serve --refiner) and refiner_switch_at.

The reference is StableDiffusion.txt2img(..., refiner=, refiner_switch_at=) called directly, whose hand-off
tests/runtime/test_sdxl_refiner.py proves equal to diffusers' denoising_end / denoising_start. A1111's rules, from
its modules/processing.py and sd_samplers_common.apply_refiner, written out here: refiner_checkpoint None, "",
"None" or "none" is no refiner; a name no checkpoint has is an error; the refiner never takes over when the switch
is at 1 (the completed ratio stays below it) or when it is the loaded model itself; its infotext gains
"Refiner: <title>, Refiner switch at: <f>"; /sd-models lists every checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.output import to_uint8
from tests.conftest import needs_torch
from tests.serving.conftest import detail_text, needs_server
from tests.serving.test_a1111_fields import _post

pytestmark = [needs_torch, needs_server]

WIDTH, HEIGHT, STEPS = 64, 48, 6
BODY = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "seed": 7, "steps": STEPS, "cfg_scale": 5.0,
        "width": WIDTH, "height": HEIGHT, "sampler_name": "Euler a", "batch_size": 2}  # fmt: skip
API = dict(negative_prompt="blurry", seed=7, steps=STEPS, cfg_scale=5.0, width=WIDTH, height=HEIGHT,
           sampler="Euler a", batch_size=2)  # fmt: skip


@pytest.fixture(scope="module")
def models(tiny_sdxl, tiny_sdxl_refiner, shared_engines):
    """(base, refiner): the tiny SDXL base with the tiny refiner attached, as serve --refiner leaves them."""
    import runtime

    base = runtime.load(tiny_sdxl, engines_dir=shared_engines)
    base.refiner = runtime.load(tiny_sdxl_refiner, engines_dir=shared_engines)
    return base, base.refiner


@pytest.fixture(scope="module")
def service(models):
    from runtime.serving import Service

    with Service(models[0]) as service:
        yield service


@pytest.fixture(scope="module")
def refiner_title(client, models):
    """The refiner's A1111 title as /sd-models lists it (beside the served model's)."""
    listed = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in listed] == [models[0].name, models[1].name]
    return listed[1]["title"]


def _refused(client, body: dict, field: str, route: str = "txt2img") -> str:
    response = client.post(f"/sdapi/v1/{route}", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", field], response.text
    return detail_text(response)


def test_refiner_request_equals_the_api_and_runs_alone(client, service, models, refiner_title):
    base, refiner = models
    expected = base.txt2img(BODY["prompt"], **API, refiner=refiner, refiner_switch_at=0.7)
    batches = service.counts["batches"]
    images, texts, info = _post(client, "txt2img", dict(BODY, refiner_checkpoint=refiner_title, refiner_switch_at=0.7))
    assert service.counts["batches"] == batches  # run alone, through StableDiffusion.txt2img, not a UNet batch
    assert len(images) == 2
    for got, want in zip(images, expected.images):
        assert np.array_equal(got, to_uint8(want))
    plain = base.txt2img(BODY["prompt"], **API)  # the refiner changed the images
    assert not np.array_equal(images[0], to_uint8(plain.images[0]))
    keys = f"Refiner: {refiner_title}, Refiner switch at: 0.7"  # A1111's entries: the refiner's title
    assert keys in texts[0] and keys in info["infotexts"][1]
    assert info["extra_generation_params"] == {"Refiner": refiner_title, "Refiner switch at": 0.7}


@pytest.mark.parametrize("form", ["name", "file name"])
def test_refiner_named_as_clients_send_it(client, models, form):
    """Besides the title: the bare name, or a file name (A1111 matches checkpoints by either); batch of one."""
    base, refiner = models
    wanted = refiner.name if form == "name" else f"models/Stable-diffusion/{refiner.name}.safetensors"
    body = dict(BODY, batch_size=1, steps=4, sampler_name="DPM++ 2M", scheduler="karras")
    images, _, _ = _post(client, "txt2img", dict(body, refiner_checkpoint=wanted, refiner_switch_at=0.5))
    api = dict(API, batch_size=1, steps=4, sampler="DPM++ 2M", schedule="Karras")
    expected = base.txt2img(BODY["prompt"], **api, refiner=refiner, refiner_switch_at=0.5)
    assert np.array_equal(images[0], to_uint8(expected.images[0]))


def test_no_hand_off_at_1_or_naming_the_served_model(client, service, models, refiner_title):
    """A1111 never switches at 1, nor to the model already loaded: plain txt2img, no Refiner keys (and the request
    may share a UNet batch again)."""
    base, _ = models
    batches = service.counts["batches"]
    body = dict(BODY, batch_size=1)
    plain = to_uint8(base.txt2img(BODY["prompt"], **dict(API, batch_size=1)).images[0])
    listed = client.get("/sdapi/v1/sd-models").json()
    for fields in ({"refiner_checkpoint": refiner_title, "refiner_switch_at": 1.0},
                   {"refiner_checkpoint": listed[0]["title"], "refiner_switch_at": 0.5},
                   {"refiner_checkpoint": "None", "refiner_switch_at": 0.5}):  # fmt: skip
        images, texts, _ = _post(client, "txt2img", dict(body, **fields))
        assert np.array_equal(images[0], plain) and "Refiner" not in texts[0], fields
    assert service.counts["batches"] == batches + 3


def test_refiner_fields_refused_by_name(client, models, refiner_title):
    _, refiner = models
    message = _refused(client, dict(BODY, refiner_checkpoint="sd_xl_refiner_1.0.safetensors"), "refiner_checkpoint")
    assert refiner_title in message and "sd_xl_refiner_1.0.safetensors" in message
    other_hash = f"{refiner.name} [0123456789]"  # the refiner's name with another checkpoint's hash
    assert refiner_title in _refused(client, dict(BODY, refiner_checkpoint=other_hash), "refiner_checkpoint")
    _refused(client, dict(BODY, refiner_checkpoint=refiner_title), "refiner_switch_at")  # null: A1111's switch at 0
    for switch in (0, -0.5):
        _refused(client, dict(BODY, refiner_checkpoint=refiner_title, refiner_switch_at=switch), "refiner_switch_at")
    init = client.post("/sdapi/v1/txt2img", json=dict(BODY, batch_size=1, steps=1)).json()["images"][0]
    img2img = {"prompt": "a cat", "init_images": [init], "steps": 2, "width": WIDTH, "height": HEIGHT,
               "refiner_checkpoint": refiner_title, "refiner_switch_at": 0.8}  # fmt: skip
    assert "txt2img only" in _refused(client, img2img, "refiner_checkpoint", "img2img")


def test_no_refiner_served_is_refused(client, models, refiner_title, monkeypatch):
    monkeypatch.delattr(models[0], "refiner")
    message = _refused(client, dict(BODY, refiner_checkpoint=refiner_title, refiner_switch_at=0.8),
                       "refiner_checkpoint")  # fmt: skip
    assert "no refiner is served" in message
    assert len(client.get("/sdapi/v1/sd-models").json()) == 1
    images, _, info = _post(client, "txt2img", dict(BODY, batch_size=1, steps=1, refiner_switch_at=0.8))
    assert len(images) == 1 and json.dumps(info["extra_generation_params"]) == "{}"  # a switch alone: no refiner


def test_serve_refiner_option(models, tiny_sdxl, tiny_sdxl_refiner, shared_engines, capsys):
    """serve --refiner loads the refiner as the model is loaded; a refiner that cannot refine the model, or --ray
    (whose replicas hold one model), is a one-line error before serving."""
    import argparse

    import cli
    from runtime.commands.serve import _load_refiner

    base, _ = models
    args = argparse.Namespace(refiner=str(tiny_sdxl_refiner), backend="onnxruntime", engines=str(shared_engines),
                              allow_pickle=False, precision="fp32")  # fmt: skip
    loaded = _load_refiner(args, base)
    assert loaded.info["sdxl"]["requires_aesthetics_score"] and loaded.vae_tiling == base.vae_tiling
    common = ["--quiet", "serve", "--engines", str(shared_engines), "--refiner", str(tiny_sdxl_refiner)]
    cases = [(["--model", str(tiny_sdxl_refiner)], "is itself an SDXL refiner"),
             (["--model", str(tiny_sdxl), "--ray"], "--refiner is not available with --ray")]  # fmt: skip
    for argv, message in cases:
        assert cli.main(common + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1

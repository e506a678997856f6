"""torch-cuda on a real GPU (tiny SD1 checkpoint): fp16 parity with the fp32 CPU reference (the torch backend, the
diffusers modules themselves), CUDA-graph replay against a fresh eager run of another backend object, recapture
after a size change, the fp32 retry of an overflowing fp16 VAE, LoRA weights invalidating the graph, and constant
read-only inputs uploaded once. Skipped only on a machine without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.gpu.conftest import needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda, needs_torch]

FP16_REL = 2e-2  # relative L2 error of an fp16 UNet against fp32 on the tiny model
REPLAY_ATOL = 2e-3  # graph replay against eager on the same GPU and dtype (cuDNN may pick other kernels)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _unet_feeds(seed: int, rows: int = 2, side: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((rows, 4, side, side), np.float32),
        "timestep": np.full(rows, 500, np.float32),
        "encoder_hidden_states": rng.standard_normal((rows, 77, 32), np.float32),
    }


def _backend(checkpoint, graph: bool):
    from runtime.backends.torch_cuda import TorchCudaBackend

    return TorchCudaBackend(checkpoint, cuda_graph=graph)


def test_unet_text_encoder_and_vae_match_the_fp32_cpu_reference(tiny_sd1):
    from runtime.backends.torch import TorchBackend

    gpu, cpu = _backend(tiny_sd1, graph=True), TorchBackend(tiny_sd1)
    feeds = _unet_feeds(0)
    assert _rel(gpu.session("unet").run(feeds)["noise_pred"], cpu.session("unet").run(feeds)["noise_pred"]) < FP16_REL
    embeds = {"inputs_embeds": np.random.default_rng(1).standard_normal((1, 77, 32), np.float32)}
    text = gpu.session("text_encoder").run(embeds)["last_hidden_state"]
    assert _rel(text, cpu.session("text_encoder").run(embeds)["last_hidden_state"]) < FP16_REL
    latent = {"latent": np.random.default_rng(2).standard_normal((1, 4, 32, 32), np.float32)}
    image = gpu.session("vae_decoder").run(latent)["image"]
    assert not gpu.session("vae_decoder").retried  # fp16 was enough: no fp32 retry
    assert _rel(image, cpu.session("vae_decoder").run(latent)["image"]) < FP16_REL


def test_graph_replay_equals_a_fresh_eager_run_and_recaptures_after_a_size_change(tiny_sd1):
    graphed = _backend(tiny_sd1, graph=True).session("unet")
    eager = _backend(tiny_sd1, graph=False).session("unet")
    graphed.run(_unet_feeds(0))  # capture
    for seed in (1, 2):  # replays with new values in the captured inputs
        feeds = _unet_feeds(seed)
        replay, fresh = graphed.run(feeds)["noise_pred"], eager.run(feeds)["noise_pred"]
        assert not np.array_equal(replay, graphed.run(_unet_feeds(0))["noise_pred"])  # not a stale output
        np.testing.assert_allclose(replay, fresh, rtol=0, atol=REPLAY_ATOL)
    assert len(graphed.graphed.graphs) == 1
    bigger = _unet_feeds(3, rows=3, side=24)  # a new shape: captured again, the first graph kept
    np.testing.assert_allclose(graphed.run(bigger)["noise_pred"], eager.run(bigger)["noise_pred"], rtol=0,
                               atol=REPLAY_ATOL)  # fmt: skip
    assert len(graphed.graphed.graphs) == 2 and all(g is not None for g in graphed.graphed.graphs.values())


def test_constant_read_only_inputs_are_uploaded_once_and_replaced_when_a_new_object_comes(tiny_sd1):
    graphed = _backend(tiny_sd1, graph=True).session("unet")
    eager = _backend(tiny_sd1, graph=False).session("unet")
    first, second = _unet_feeds(4), _unet_feeds(5)
    for feeds in (first, second):
        feeds["encoder_hidden_states"].flags.writeable = False  # the denoiser's per-generation constant
    graphed.run(first)
    kept = graphed.uploads.last["encoder_hidden_states"][1]
    for _ in range(2):
        out = graphed.run(dict(first, sample=first["sample"] * 0.5))["noise_pred"]
        assert graphed.uploads.last["encoder_hidden_states"][1] is kept  # no new upload
    np.testing.assert_allclose(out, eager.run(dict(first, sample=first["sample"] * 0.5))["noise_pred"], rtol=0,
                               atol=REPLAY_ATOL)  # fmt: skip
    mixed = dict(first, encoder_hidden_states=second["encoder_hidden_states"])  # another object: uploaded
    np.testing.assert_allclose(graphed.run(mixed)["noise_pred"], eager.run(mixed)["noise_pred"], rtol=0,
                               atol=REPLAY_ATOL)  # fmt: skip
    writable = dict(first, encoder_hidden_states=second["encoder_hidden_states"].copy())
    writable["encoder_hidden_states"] *= 2  # a writable array is uploaded every time, even the same object
    before = graphed.run(writable)["noise_pred"]
    writable["encoder_hidden_states"] *= 0.5
    np.testing.assert_allclose(graphed.run(writable)["noise_pred"], eager.run(writable)["noise_pred"], rtol=0,
                               atol=REPLAY_ATOL)  # fmt: skip
    assert not np.allclose(before, graphed.run(writable)["noise_pred"])


def test_an_overflowing_fp16_vae_decode_is_retried_in_fp32(tiny_sd1):
    import torch

    from runtime.backends.torch import TorchBackend

    backend = _backend(tiny_sd1, graph=True)
    decoder = backend.session("vae_decoder")
    with torch.no_grad():
        backend._modules["vae"].post_quant_conv.weight.fill_(60000.0)  # fp16 overflows to inf at the first conv
    latent = {"latent": np.ones((1, 4, 32, 32), np.float32)}
    image = decoder.run(latent)["image"]
    assert decoder.retried and np.isfinite(image).all()
    reference = TorchBackend(tiny_sd1).session("vae_decoder").run(latent)["image"]  # the checkpoint's fp32 VAE
    assert _rel(image, reference) < 1e-2  # fp32 on the GPU (TF32 convolutions) against fp32 on the CPU


def test_lora_weights_invalidate_the_graph(tiny_sd1):
    graphed_backend, eager_backend = _backend(tiny_sd1, graph=True), _backend(tiny_sd1, graph=False)
    graphed, eager = graphed_backend.session("unet"), eager_backend.session("unet")
    feeds = _unet_feeds(6)
    before = graphed.run(feeds)["noise_pred"]
    graphed.run(feeds)  # replayed
    base = graphed_backend._module("unet").conv_in.weight.detach().float().cpu().numpy()
    patch = {"unet": {"conv_in.weight": base * 1.5}}
    graphed_backend.apply_weights(patch)
    eager_backend.apply_weights(patch)
    assert graphed.graphed.graphs == {}  # dropped: the next call captures the new weights
    after = graphed.run(feeds)["noise_pred"]
    assert _rel(after, before) > 1e-2
    np.testing.assert_allclose(after, eager.run(feeds)["noise_pred"], rtol=0, atol=REPLAY_ATOL)
    graphed_backend.apply_weights(None)  # back to base: the first output again
    np.testing.assert_allclose(graphed.run(feeds)["noise_pred"], before, rtol=0, atol=REPLAY_ATOL)


def test_depth2img_runs_and_matches_the_cpu_reference(tiny_sd2_depth):
    from PIL import Image

    import runtime

    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), np.uint8))
    options = dict(steps=3, seed=2, strength=0.8, sampler="Euler")
    gpu = runtime.load(tiny_sd2_depth, backend="torch-cuda").depth2img("a room", image, **options)
    cpu = runtime.load(tiny_sd2_depth, backend="torch").depth2img("a room", image, **options)
    assert _rel(gpu.images, cpu.images) < FP16_REL

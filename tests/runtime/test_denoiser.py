"""The denoiser against float64 formulas, with a fake UNet: scaling, guidance, AND, eps/v, per-call text."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.denoiser import Denoiser
from runtime.pipelines.conditioning import Conditioning


class FakeUnet:
    """noise_pred = sample * (1 + mean of the text rows) + t / 1000: depends on every input."""

    def __init__(self):
        self.feeds = []

    def run(self, feeds, outputs=None):
        self.feeds.append(feeds)
        text = feeds["encoder_hidden_states"].mean(axis=(1, 2))[:, None, None, None]
        out = feeds["sample"] * (1 + text) + feeds["timestep"][:, None, None, None] / 1000
        return {"noise_pred": out.astype(np.float32)}


def reference(x, sigma, t, texts, weights, cfg, v_prediction, guided):
    """float64: uncond + sum_i w_i cfg (cond_i - uncond), then eps or v -> denoised."""
    x = x.astype(np.float64)
    c_in = 1 / np.sqrt(sigma**2 + 1)
    outs = [x * c_in * (1 + text.mean()) + t / 1000 for text in texts]
    if guided:
        out = outs[0] + sum(w * cfg * (cond - outs[0]) for w, cond in zip(weights, outs[1:]))
    else:
        out = outs[0]
    if v_prediction:
        return x / (sigma**2 + 1) - out * sigma * c_in
    return x - sigma * out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("weights", [[1.0], [1.0, 0.5], [0.7, 1.2, -0.3]])
def test_guidance_and_composition(prediction_type, weights):
    rng = np.random.default_rng(0)
    batch, m = 2, len(weights)
    texts = [rng.normal(size=(1, 77, 8)).astype(np.float32) for _ in range(1 + m)]  # uncond, cond_1..m
    rows = np.concatenate([np.repeat(t, batch, axis=0) for t in texts])  # [(1 + m) B, 77, 8]
    conditioning = Conditioning([rows], np.zeros(1, dtype=np.int64), np.array(weights, dtype=np.float32), True)
    unet = FakeUnet()
    denoiser = Denoiser(unet, conditioning, 7.5, prediction_type)
    x = rng.normal(size=(batch, 4, 6, 5)).astype(np.float32)
    denoised = denoiser(x, 3.2, 640.0)
    assert unet.feeds[0]["sample"].shape == ((1 + m) * batch, 4, 6, 5)
    expected = reference(x, 3.2, 640.0, texts, weights, 7.5, prediction_type == "v_prediction", True)
    np.testing.assert_allclose(denoised, expected, rtol=2e-5, atol=2e-5)


def test_no_guidance_runs_cond_only():
    rng = np.random.default_rng(1)
    text = rng.normal(size=(1, 77, 8)).astype(np.float32)
    rows = np.repeat(text, 3, axis=0)
    conditioning = Conditioning([rows], np.zeros(1, dtype=np.int64), np.ones(1, np.float32), False)
    unet = FakeUnet()
    x = rng.normal(size=(3, 4, 4, 4)).astype(np.float32)
    denoised = Denoiser(unet, conditioning, 1.0, "epsilon")(x, 0.5, 10.0)
    assert unet.feeds[0]["sample"].shape == (3, 4, 4, 4)
    np.testing.assert_allclose(denoised, reference(x, 0.5, 10.0, [text], [1.0], 1.0, False, False), rtol=2e-5)


def test_text_batch_follows_the_call_table():
    batches = [np.full((2, 77, 4), float(i), dtype=np.float32) for i in range(3)]
    conditioning = Conditioning(batches, np.array([0, 0, 1, 2, 1]), np.ones(1, np.float32), True)
    unet = FakeUnet()
    denoiser = Denoiser(unet, conditioning, 5.0, "epsilon")
    x = np.ones((1, 4, 2, 2), dtype=np.float32)
    for _ in range(7):  # past the table's end the last entry holds
        denoiser(x, 1.0, 1.0)
    used = [int(f["encoder_hidden_states"][0, 0, 0]) for f in unet.feeds]
    assert used == [0, 0, 1, 2, 1, 1, 1]


def test_extra_channels_and_feeds_reach_every_call():
    """depth2img / upscale: channels after the scaled latents and more inputs (class labels), all N rows."""
    text = np.zeros((4, 77, 4), np.float32)  # uncond and cond rows of 2 images
    conditioning = Conditioning([text], np.zeros(1, np.int64), np.ones(1, np.float32), True)
    unet = FakeUnet()
    unet_run = unet.run
    unet.run = lambda feeds, outputs=None: {"noise_pred": unet_run(feeds)["noise_pred"][:, :4]}  # 4 of 7 channels
    channels = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1) * np.ones((4, 3, 2, 2), np.float32)  # [N, 3, h, w]
    labels = np.full(4, 20, dtype=np.int64)
    feeds = {"class_labels": labels}
    denoiser = Denoiser(unet, conditioning, 5.0, "epsilon", extra_channels=channels, extra_feeds=feeds)
    x = np.ones((2, 4, 2, 2), dtype=np.float32)
    for sigma in (3.0, 1.0):
        unet.feeds.clear()
        denoiser(x, sigma, 1.0)
        (feeds,) = unet.feeds
        assert feeds["sample"].shape == (4, 7, 2, 2) and feeds["class_labels"] is labels
        np.testing.assert_allclose(feeds["sample"][:, :4], 1 / np.sqrt(sigma**2 + 1), rtol=1e-6)  # scaled latents
        assert np.array_equal(feeds["sample"][:, 4:], channels)  # extra channels as given, unscaled

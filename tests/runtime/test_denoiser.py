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


class ReusingUnet:
    """A GPU-like session: returns one output buffer it overwrites every call, and records what it was fed."""

    def __init__(self):
        self.out = None
        self.seen = []

    def run(self, feeds, outputs=None):
        self.seen.append({name: (value, value.flags.writeable, value.copy()) for name, value in feeds.items()})
        sample = feeds["sample"][:, :4]
        if self.out is None:
            self.out = np.empty(sample.shape, np.float32)
        np.multiply(sample, np.float32(0.5), out=self.out)
        self.out += feeds["timestep"][:, None, None, None] / np.float32(1000)
        return {"noise_pred": self.out}


def test_constant_feeds_are_one_read_only_object_and_per_step_feeds_are_refilled():
    """The contract GPU sessions rely on to upload text and class labels once per generation."""
    owner = np.random.default_rng(2).normal(size=(2, 4, 77, 8)).astype(np.float32)
    view = owner[1]  # a view of an array the denoiser does not own: it must be copied, not frozen in place
    batches = [np.ones((4, 77, 8), np.float32), view]
    conditioning = Conditioning(batches, np.array([0, 1, 0]), np.ones(1, np.float32), True)
    labels = np.full(4, 20, dtype=np.int64)
    channels = np.full((4, 3, 2, 2), 9.0, np.float32)
    unet = ReusingUnet()
    denoiser = Denoiser(unet, conditioning, 5.0, "epsilon", extra_feeds={"class_labels": labels})
    denoiser.extra_channels = channels  # as the pipelines set it, after construction
    x = np.arange(2 * 4 * 2 * 2, dtype=np.float32).reshape(2, 4, 2, 2) / 10
    results = [denoiser(x, sigma, t) for sigma, t in ((3.0, 900.0), (2.0, 800.0), (1.0, 700.0))]
    first, second, third = unet.seen
    assert first["encoder_hidden_states"][0] is third["encoder_hidden_states"][0] is denoiser.batches[0]
    assert second["encoder_hidden_states"][0] is not view and owner.flags.writeable and view.flags.writeable
    assert np.array_equal(second["encoder_hidden_states"][2], view)
    assert first["class_labels"][0] is third["class_labels"][0] is labels
    for feeds in (first, second, third):
        assert not feeds["encoder_hidden_states"][1] and not feeds["class_labels"][1]  # read-only
        assert feeds["sample"][1] and feeds["timestep"][1]  # writeable buffers, refilled each call
    assert first["sample"][0] is third["sample"][0] and first["timestep"][0] is third["timestep"][0]
    for feeds, (sigma, t) in zip((first, second, third), ((3.0, 900.0), (2.0, 800.0), (1.0, 700.0))):
        sample, timestep = feeds["sample"][2], feeds["timestep"][2]  # the values at the time of the call
        np.testing.assert_allclose(sample[:, :4], np.concatenate([x, x]) / np.sqrt(sigma**2 + 1), rtol=1e-6)
        assert np.array_equal(sample[:, 4:], channels) and np.all(timestep == np.float32(t))
    # results stay valid although the session reused its output buffer for the later calls
    for result, (sigma, t) in zip(results, ((3.0, 900.0), (2.0, 800.0), (1.0, 700.0))):
        expected = reference_reusing(x, sigma, t, 5.0)
        np.testing.assert_allclose(result, expected, rtol=2e-5, atol=2e-5)


def reference_reusing(x, sigma, t, cfg):
    """ReusingUnet's eps (same for uncond and cond: guidance returns it) -> denoised, float64."""
    eps = x.astype(np.float64) / np.sqrt(sigma**2 + 1) * 0.5 + t / 1000
    return x - sigma * eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_float32_results_are_bit_identical_to_the_plain_expressions(prediction_type):
    """Buffers and in-place arithmetic must not change a single bit: the denoiser equals the straightforward float32
    numpy expressions of input scaling, guidance (uncond + s (cond - uncond), AND terms added in order) and the
    eps / v conversion, evaluated with allocating operators."""
    rng = np.random.default_rng(5)
    texts = rng.normal(size=(3, 2, 77, 8)).astype(np.float32)  # uncond, cond_1, cond_2; B = 2
    weights = np.array([1.0, 0.4], np.float32)
    conditioning = Conditioning([texts.reshape(6, 77, 8)], np.zeros(1, np.int64), weights, True)
    unet = FakeUnet()
    denoiser = Denoiser(unet, conditioning, 7.5, prediction_type)
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32) * np.float32(14.6)
    for sigma, t in ((14.6, 999.0), (0.7311, 281.0)):
        got = denoiser(x, sigma, t)
        c_in = 1.0 / np.sqrt(sigma * sigma + 1.0)
        x_in = np.concatenate([x * np.float32(c_in)] * 3)
        timestep = np.full(6, t, dtype=np.float32)
        out = FakeUnet().run({"sample": x_in, "timestep": timestep, "encoder_hidden_states": texts.reshape(6, 77, 8)})
        uncond, cond_1, cond_2 = np.split(out["noise_pred"], 3)
        s_1, s_2 = np.float32(7.5 * np.float32(1.0)), np.float32(7.5 * np.float32(0.4))
        guided = uncond + s_1 * (cond_1 - uncond)
        guided += s_2 * (cond_2 - uncond)
        if prediction_type == "epsilon":
            expected = x - np.float32(sigma) * guided
        else:
            expected = x * np.float32(1.0 / (sigma * sigma + 1.0)) + guided * np.float32(-sigma * c_in)
        assert got.dtype == np.float32 and np.array_equal(got, expected)

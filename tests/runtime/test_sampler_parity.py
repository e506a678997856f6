"""Every sampler and schedule type with a diffusers counterpart, end to end through the CLI's .npy output.

10 steps, CFG 6, batch of 2 (seeds s, s + 1), on the tiny epsilon and v-prediction checkpoints; a second
step count for the multistep samplers. Equal to diffusers' StableDiffusionPipeline with that scheduler:
mean absolute difference <= 2e-5, max <= 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest

import cli
from runtime.samplers import SAMPLER_NAMES, SPECS
from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import (
    CFG,
    HEIGHT,
    NEGATIVE,
    PROMPT,
    SEED,
    WIDTH,
    assert_parity,
    reference_images,
)

pytestmark = needs_torch

MULTISTEP = ("PLMS", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "UniPC")
CASES = [
    (name, schedule, steps)
    for name in SAMPLER_NAMES
    if SPECS[name].matches_diffusers
    for schedule in SPECS[name].schedule_types
    for steps in ((10, 17) if name in MULTISTEP else (10,))
]


@pytest.fixture(scope="module")
def engines(shared_engines):
    return shared_engines  # the session's exports of the tiny checkpoints (tests/conftest.py)


def run_cli(folder, engines, out, sampler, schedule, steps, *extra):
    argv = f"--quiet txt2img --steps {steps} --cfg-scale {CFG} --seed {SEED} --batch-size 2".split()
    argv += ["--width", str(WIDTH), "--height", str(HEIGHT), "--prompt", PROMPT, "--negative-prompt", NEGATIVE]
    argv += ["--model", str(folder), "--engines", str(engines), "--output", str(out)]
    argv += ["--sampler", sampler, "--schedule", schedule, *extra]
    assert cli.main(argv) == 0
    return np.load(out)


@pytest.mark.parametrize(("sampler", "schedule", "steps"), CASES)
@pytest.mark.parametrize("variant", ["sd1", "sd2v"])
def test_cli_sampler_matches_diffusers(tiny_sd1, tiny_sd2v, engines, tmp_path, variant, sampler, schedule, steps):
    folder = {"sd1": tiny_sd1, "sd2v": tiny_sd2v}[variant]
    images = run_cli(folder, engines, tmp_path / "x.npy", sampler, schedule, steps)
    assert_parity(images, reference_images(folder, sampler, schedule, steps=steps))


@pytest.mark.parametrize("variant", ["sd1", "sd2v"])
def test_ddim_eta_matches_diffusers(tiny_sd1, tiny_sd2v, engines, tmp_path, variant):
    folder = {"sd1": tiny_sd1, "sd2v": tiny_sd2v}[variant]
    images = run_cli(folder, engines, tmp_path / "x.npy", "DDIM", "default", 10, "--eta", "0.5")
    assert_parity(images, reference_images(folder, "DDIM", "default", eta=0.5))


def test_eta_only_where_the_sampler_takes_it(tiny_sd1, engines, tmp_path, capsys):
    argv = ["--quiet", "txt2img", "--model", str(tiny_sd1), "--engines", str(engines), "--prompt", "a cat"]
    argv += ["--sampler", "Euler", "--eta", "0.3", "--output", str(tmp_path / "x.png")]
    assert cli.main(argv) == 2
    expected = "error: eta applies to DDIM and the ancestral and SDE samplers, not to Euler"
    assert capsys.readouterr().err.strip() == expected


def test_samplers_command_lists_every_sampler(capsys):
    import json

    assert cli.main(["samplers", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in listing["samplers"]] == list(SAMPLER_NAMES)
    assert all(row["description"] for row in listing["samplers"])
    assert listing["schedule_types"][:5] == ["default", "Karras", "Exponential", "SGM Uniform", "Beta"]
    a1111 = {"Uniform", "Polyexponential", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM"}
    assert a1111 <= set(listing["schedule_types"])  # A1111 1.10's other schedule types
    assert cli.main(["samplers"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in SAMPLER_NAMES)

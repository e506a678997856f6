"""The refiner: an SDXL base model's txt2img hands its latents to a second model part way through the schedule.

A1111's `refiner_checkpoint` + `refiner_switch_at`, computed as diffusers splits the work between
StableDiffusionXLPipeline(denoising_end=f, output_type="latent") and StableDiffusionXLImg2ImgPipeline(refiner,
denoising_start=f):

* the switch is a noise level, not a step count: with T training timesteps, the base runs the steps whose timestep is
  >= round(T - f T), the refiner the rest (its own schedule of the same steps, from the first timestep below that);
* the refiner starts from the base's latents as they are (no noise added, nothing drawn), with its own conditioning
  (a refiner's: text encoder 2 only, time ids with the aesthetic score) and its own fresh sampler state (a multistep
  sampler restarts its warm-up); each image's noise stream continues from where the base left it;
* the refiner's VAE decodes.

With the hires fix (refined_second_pass), as A1111's default hires_fix_refiner_pass "second pass": the first pass runs
on the base alone; the second pass (its own schedule, started at the hires strength) runs on the base until the same
switch, then on the refiner as above (diffusers: the base's StableDiffusionXLImg2ImgPipeline with strength and
denoising_end, then the refiner's with denoising_start), time ids of the hires size.

(A1111 itself switches after the fraction f of the steps and keeps one sampler running; the two agree on the steps
whenever the timesteps are evenly spaced and the sampler keeps no history, e.g. Euler and Euler a.)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidRequestError
from ..request import sampler_of
from ..samplers import make_schedule
from .common import decode_latents, image_generators
from .conditioning import build_conditioning, schedule_steps
from .img2img import denoise_latents
from .sdxl import is_refiner, is_sdxl
from .txt2img import sample_latents
from .variation import initial_noise

if TYPE_CHECKING:
    from ..api import StableDiffusion
    from ..request import Img2ImgRequest, Txt2ImgRequest


def check_refiner(base: StableDiffusion, refiner, switch_at) -> None:
    """InvalidRequestError unless `refiner` (a loaded model) can refine `base`'s txt2img at `switch_at` in (0, 1]."""
    from ..api import StableDiffusion

    if not isinstance(refiner, StableDiffusion):
        raise InvalidRequestError(f"the refiner must be a loaded model (runtime.load(...)), not {refiner!r}")
    if isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)) or not 0 < switch_at <= 1:
        raise InvalidRequestError(f"refiner switch at must be a number in (0, 1], not {switch_at!r}")
    for role, model in (("base", base), ("refiner", refiner)):
        if not is_sdxl(model.info) or model.info["unet_in_channels"] != 4:
            raise InvalidRequestError(f"a refiner runs with SDXL models only (4-channel UNets); the {role} is not one")
    if is_refiner(base.info):
        raise InvalidRequestError("the base model is itself an SDXL refiner: it cannot start from text")


def switch_step(timesteps: np.ndarray, switch_at: float, num_train_timesteps: int) -> int:
    """How many steps of a schedule the base runs: those whose timestep is >= round(T - f T) (diffusers'
    denoising_end); the refiner's denoising_start then starts at the first timestep below it."""
    cutoff = int(round(num_train_timesteps - switch_at * num_train_timesteps))
    return int(np.count_nonzero(np.asarray(timesteps) >= cutoff))


def refined_txt2img(
    base: StableDiffusion, refiner: StableDiffusion, request: Txt2ImgRequest, switch_at: float
) -> np.ndarray:
    """Images float32 [B, H, W, 3] in [0, 1]: the base's txt2img until `switch_at`, the refiner's steps after it."""
    spec, schedule_type = sampler_of(request)
    config = base.info["scheduler_config"]
    schedule = make_schedule(spec, schedule_type, config, request.steps, family="sdxl")
    switch = switch_step(schedule.timesteps, switch_at, _train_steps(config))
    generators = image_generators(request.seed, request.batch_size)
    if switch == 0:  # the base runs no step: the refiner starts from the initial noise
        shape = (base.info["latent_channels"], request.height // base.info["vae_scale_factor"],
                 request.width // base.info["vae_scale_factor"])  # fmt: skip
        x = initial_noise(request, generators, shape) * np.float32(schedule.init_noise_sigma)  # [B, 4, h, w]
        held = schedule.latents_after(-1, x)
    else:
        held = _base_latents(base, request, generators, switch)  # [B, 4, h, w] as diffusers holds them
        if base.interrupt_hook is not None and base.interrupt_hook():  # interrupted: no refiner pass
            return decode_latents(base, held)
    share_embeddings(base, refiner)
    return decode_latents(refiner, _refine(refiner, request, held, generators, switch_at))


def share_embeddings(base: StableDiffusion, refiner: StableDiffusion) -> None:
    """A1111 keeps one set of textual inversions for every model it runs: the refiner reads the base's embedding
    folder (an SDXL embedding's clip_g part goes into its one text encoder) unless it loaded that folder already."""
    if base.embeddings_source is not None and refiner.embeddings_source != base.embeddings_source:
        refiner.load_embeddings(*base.embeddings_source)


def _base_latents(base: StableDiffusion, request: Txt2ImgRequest, generators: list, switch: int) -> np.ndarray:
    """The base's first `switch` steps of the request's schedule: the latents diffusers' base pipeline returns with
    denoising_end (its scheduler's sample after that step)."""
    from .common import SamplingInterrupted

    spec, _ = sampler_of(request)
    conditioning = build_conditioning(base, request.prompt, request.negative_prompt, request.batch_size,
                                      request.cfg_scale, schedule_steps(spec.name, request.steps), request.emphasis,
                                      request.clip_skip)  # fmt: skip

    def stop_at_switch(i: int, x: np.ndarray) -> np.ndarray:
        if i + 1 == switch:
            raise SamplingInterrupted(i, x)
        return x

    hook = base.interrupt_hook or (lambda: False)
    return sample_latents(base, request, conditioning, generators, stop_at_switch, interrupted=hook)


def refined_second_pass(
    base: StableDiffusion,
    refiner: StableDiffusion,
    switch_at: float,
    request: Img2ImgRequest,
    init_latents: np.ndarray,
    generators: list,
    steps: int,
    start: int,
    size: tuple[int, int],
) -> np.ndarray:
    """Images float32 [B, H, W, 3]: a hires fix's second pass (steps start.. of a `steps`-step schedule from the
    upscaled init_latents, time ids of `size`) with a refiner, as A1111's hires_fix_refiner_pass "second pass": the
    base until the switch, the refiner after it. A switch before the pass's first step: the refiner runs all of it
    (noise added from the streams as for the base); after its last step: the base alone, its VAE decoding."""
    spec, schedule_type = sampler_of(request)
    config = base.info["scheduler_config"]
    schedule = make_schedule(spec, schedule_type, config, steps, family="sdxl")
    switch = switch_step(schedule.timesteps, switch_at, _train_steps(config))
    if switch >= steps or start >= steps:  # the refiner never takes over: the plain hires fix
        latents = denoise_latents(base, request, init_latents, generators, steps, start, "hires fix", size=size)
        return decode_latents(base, latents)
    share_embeddings(base, refiner)
    if switch <= start:  # the refiner runs the whole second pass
        latents = denoise_latents(refiner, request, init_latents, generators, steps, start, "refiner", size=size)
        return decode_latents(refiner, latents)
    held = _base_second_pass(base, request, init_latents, generators, steps, start, switch - start, size)
    if base.interrupt_hook is not None and base.interrupt_hook():  # interrupted: no refiner steps
        return decode_latents(base, held)
    return decode_latents(refiner, _refine(refiner, request, held, generators, switch_at, steps, size))


def _base_second_pass(
    base: StableDiffusion,
    request: Img2ImgRequest,
    init_latents: np.ndarray,
    generators: list,
    steps: int,
    start: int,
    runs: int,
    size: tuple[int, int],
) -> np.ndarray:
    """The base's first `runs` steps of the second pass (diffusers' img2img with denoising_end): its scheduler's
    latents after them, ended through the model's interrupt hook (asked after each step), which is then restored."""
    hook, asked = base.interrupt_hook, 0

    def stop_at_switch() -> bool:
        nonlocal asked
        asked += 1
        return asked == runs or (hook is not None and hook())

    base.interrupt_hook = stop_at_switch
    try:
        return denoise_latents(base, request, init_latents, generators, steps, start, "hires fix", size=size)
    finally:
        base.interrupt_hook = hook


def _refine(
    refiner: StableDiffusion,
    request: Txt2ImgRequest | Img2ImgRequest,
    held: np.ndarray,
    generators: list,
    switch_at: float,
    steps: int | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The refiner's steps from diffusers' denoising_start on `held` (the base's latents): the latents to decode.
    steps: the schedule's length (None: the request's); size: SDXL's (height, width) ids (None: the request's)."""
    steps = steps or request.steps
    spec, schedule_type = sampler_of(request)
    config = refiner.info["scheduler_config"]
    schedule = make_schedule(spec, schedule_type, config, steps, family="sdxl")
    start = switch_step(schedule.timesteps, switch_at, _train_steps(config))  # diffusers' t_start
    if start >= schedule.steps:  # nothing left for the refiner
        return held
    sigma = schedule.sigmas[start]
    x = held * np.float32(math.sqrt(1 + sigma * sigma)) if schedule.vp_samples else held  # VE x at sigmas[start]
    size = size or (request.height, request.width)
    return denoise_latents(refiner, request, x, generators, steps, start, "refiner", size=size, noised=True)


def _train_steps(config: dict) -> int:
    return config.get("num_train_timesteps", 1000)


def refiner_parameters(refiner: StableDiffusion, switch_at: float) -> dict:
    """The infotext entries A1111 writes for a refiner: its checkpoint's title (name [hash]) and the switch."""
    return {"Refiner": f"{refiner.name} [{refiner.key.rsplit('-', 1)[-1]}]", "Refiner switch at": switch_at}

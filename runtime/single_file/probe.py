"""Whether an SD 2.x UNet predicts v or epsilon: the A1111 web UI's test, run on the converted UNet.

Shapes cannot tell the two apart. A1111 (modules/sd_models_config.py, is_using_v_parameterization_for_sd2) runs the
UNet once on a constant input, x = 0.5 everywhere at t = 999 with a constant 0.5 context, and calls the model
v-prediction when mean(output - x) < -1: near t = 999 an epsilon model returns about x itself (the noise is nearly
all of x), while a v model returns about -x0, far from x. It needs torch; conversion happens right before an export,
which needs torch anyway.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)
PROBE_TIMESTEP = 999
PROBE_VALUE = 0.5
V_THRESHOLD = -1.0


def probe_prediction_type(unet_folder: Path) -> str | None:
    """ "v_prediction" or "epsilon" by A1111's test on the diffusers UNet in `unet_folder` (run by the torch backend's
    UNet session, so this module never imports torch); None without torch."""
    if any(importlib.util.find_spec(name) is None for name in ("torch", "diffusers")):
        return None
    from ..backends.torch import TorchBackend

    unet = TorchBackend(unet_folder.parent).session("unet")  # ModelError when the converted UNet does not load
    cross_attention_dim = unet.module.config.cross_attention_dim
    x = np.full((1, unet.module.config.in_channels, 8, 8), PROBE_VALUE, np.float32)
    feeds = {
        "sample": x,
        "timestep": np.array([PROBE_TIMESTEP], np.float32),
        "encoder_hidden_states": np.full((1, 2, cross_attention_dim), PROBE_VALUE, np.float32),
    }
    out = unet.run(feeds)["noise_pred"]
    score = float((out - x[:, : out.shape[1]]).mean())
    logger.info("v-prediction probe: mean(unet(x) - x) = %.3f (v-prediction below %g)", score, V_THRESHOLD)
    return "v_prediction" if score < V_THRESHOLD else "epsilon"

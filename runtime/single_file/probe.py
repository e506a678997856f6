"""Whether an SD 2.x UNet predicts v or epsilon: the A1111 web UI's test, run on the converted UNet.

Shapes cannot tell the two apart. A1111 (modules/sd_models_config.py, is_using_v_parameterization_for_sd2) runs the
UNet once on a constant input, x = 0.5 everywhere at t = 999 with a constant 0.5 context, and calls the model
v-prediction when mean(output - x) < -1: near t = 999 an epsilon model returns about x itself (the noise is nearly
all of x), while a v model returns about -x0, far from x. It needs torch; conversion happens right before an export,
which needs torch anyway.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ModelError

logger = logging.getLogger(__name__)
PROBE_TIMESTEP = 999
PROBE_VALUE = 0.5
V_THRESHOLD = -1.0


def probe_prediction_type(unet_folder: Path) -> str | None:
    """ "v_prediction" or "epsilon" by A1111's test on the diffusers UNet in `unet_folder`; None without torch."""
    try:
        import torch
        from diffusers import UNet2DConditionModel
    except ImportError:
        return None
    try:
        unet = UNet2DConditionModel.from_pretrained(unet_folder, torch_dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"the converted UNet does not load: {str(exc).splitlines()[0][:160]}") from exc
    context = torch.full((1, 2, unet.config.cross_attention_dim), PROBE_VALUE)
    x = torch.full((1, unet.config.in_channels, 8, 8), PROBE_VALUE)
    with torch.no_grad():
        out = unet(x, torch.tensor([PROBE_TIMESTEP]), encoder_hidden_states=context).sample
    score = float((out - x[:, : out.shape[1]]).mean())
    logger.info("v-prediction probe: mean(unet(x) - x) = %.3f (v-prediction below %g)", score, V_THRESHOLD)
    return "v_prediction" if score < V_THRESHOLD else "epsilon"

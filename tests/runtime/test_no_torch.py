"""The runtime generates from exported ONNX with torch (and diffusers/transformers) impossible to import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import needs_torch

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter where importing torch, diffusers or transformers raises ImportError.
SCRIPT = """
import json, sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None
import runtime
sd = runtime.load(sys.argv[1], backend="onnxruntime")
result = sd.txt2img("a cat", steps=3, seed=7, width=32, height=32, sampler="Euler a")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers") and sys.modules[m])
print(json.dumps({"shape": list(result.images.shape), "heavy": heavy, "finite": bool((result.images >= 0).all())}))
"""


def test_import_runtime_does_not_import_torch():
    code = "import sys, runtime, runtime.api, runtime.samplers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_torch
def test_generate_from_onnx_without_torch(tiny_sd1, shared_engines):
    from export import export_model

    artifacts = export_model(tiny_sd1, shared_engines, progress=False)  # the session's export
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(artifacts)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"shape": [1, 32, 32, 3], "heavy": [], "finite": True}

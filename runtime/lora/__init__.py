"""LoRA: low-rank weight deltas merged into the text encoder and UNet (kohya/A1111 and diffusers/PEFT files).

files       read .safetensors (and, if allowed, torch pickles) into numpy; A1111's short hash
keys        key formats -> LoraLayer (module, down, up, alpha / rank), checked against the model's parameters
apply       merge base + sum of deltas, hand full values to the backend's `apply_weights`; LoraState
sources     parameter shapes and base values: the backend, an artifact folder, or a checkpoint folder
weight_map  ONNX initializer -> diffusers parameter, written at export (also used by TensorRT refit)
requests    prompt tags, `loras=[...]`, infotext "Lora hashes" (the `with_loras` decorator of the API)
"""

"""CustomVideoXAdapterLoader: a CustomVideoX adapter (LoRA) from models/loras in any common key layout."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..cvx_core.lora_keys import LoraKeyError
from ..cvx_host.adapters import FOLDER, MODES, adapter_family, load_adapter, log_report, resolve_lora_path
from .types import CATEGORY


class CustomVideoXAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXAdapterLoader",
            display_name="CustomVideoX Load Adapter",
            category=CATEGORY,
            description="Loads a CustomVideoX adapter (LoRA) from models/loras in diffusers/PEFT, kohya or "
                        "ComfyUI key layout. reference_only: the LoRA acts on the reference tokens only, so "
                        "without a reference the model is exactly the base model. Works before or after "
                        "CustomVideoXApply and the core LoRA loaders. CogVideoX and Wan (on Wan: the "
                        "reference CustomVideoXApply inserts; self-attention q/k/v/o, cross-attention q/o, FFN).",
            inputs=[
                io.Model.Input("model", tooltip="A CogVideoX or Wan text-to-video MODEL (before or after "
                                                "CustomVideoXApply)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A .safetensors LoRA under models/loras. PEFT files take alpha from "
                                       "adapter_config.json beside them or from their metadata."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Multiplies the LoRA's update (0 = off)."),
                io.Combo.Input("mode", options=list(MODES), default="reference_only",
                               tooltip="reference_only: applied to the reference tokens' projections only (how "
                                       "CustomVideoX adapters are trained). global: a plain weight patch on every "
                                       "token, like the core LoRA loaders (for ordinary LoRAs)."),
            ],
            outputs=[io.Model.Output(display_name="model"),
                     io.String.Output(display_name="report", tooltip="Which keys were used and which were not.")],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength: float = 1.0, mode: str = "reference_only") -> io.NodeOutput:
        adapter_family(model)  # a clear error for a model the adapters do not handle, before the file is read
        try:
            patched, report = load_adapter(model, resolve_lora_path(lora_name), strength, mode)
        except (LoraKeyError, ValueError) as e:
            raise LoraKeyError(f"CustomVideoXAdapterLoader (lora_name={lora_name!r}): {e}") from e
        log_report(report)
        return io.NodeOutput(patched, report.text())

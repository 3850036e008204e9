"""The pack's nodes (V3 schema). Node ids and input names are an interface: never rename them."""

from __future__ import annotations

from comfy_api.latest import io

from .adapter_loader import CustomVideoXAdapterLoader
from .apply import CustomVideoXApply
from .entity_region import CustomVideoXEntityRegion
from .evaluate import CustomVideoXEvaluate
from .model_loader import CustomVideoXModelLoader
from .reference_encode import CustomVideoXReferenceEncode
from .reference_frames_bias import CustomVideoXReferenceFramesBias
from .tab_schedule import CustomVideoXTABSchedule
from .train_adapter import CustomVideoXTrainAdapter

NODES: list[type[io.ComfyNode]] = [
    CustomVideoXModelLoader,
    CustomVideoXReferenceEncode,
    CustomVideoXApply,
    CustomVideoXTABSchedule,
    CustomVideoXEntityRegion,
    CustomVideoXAdapterLoader,
    CustomVideoXTrainAdapter,
    CustomVideoXEvaluate,
    CustomVideoXReferenceFramesBias,
]

"""Dev stand-in nodes: a separate ComfyUI node package, never imported by the pack (nodes/, cvx_core/).

The tiny demo (`make run --tiny`, `python -m evaluation --tiny`) and the tests load this folder into the
host as an extra custom node folder, so the tiny random model runs without T5 weights or photos:

- CVXTestTextConditioning: random text conditioning of a chosen shape, so no T5 weights are needed.
- CVXTestImage: a deterministic smooth IMAGE batch (a stand-in reference photo or video).
- CVXTestSaveTensor: saves any LATENT / IMAGE / MASK / tensor to ``<output>/cvx_test_tensors/<name>.pt``
  so server tests can compare numbers, not just pixels.

(The node ids keep their ``CVXTest`` prefix: saved test graphs and example conversions name them.)
"""

from __future__ import annotations

import os
import re

import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

TENSOR_SUBFOLDER = "cvx_test_tensors"


class CVXTestTextConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CVXTestTextConditioning",
            display_name="CVX Test Text Conditioning (dev stand-in)",
            category="customvideox/dev",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Int.Input("length", default=226, min=1, max=4096),
                io.Int.Input("dim", default=32, min=1, max=8192),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed: int, length: int, dim: int) -> io.NodeOutput:
        gen = torch.Generator().manual_seed(seed)
        cond = torch.randn((1, length, dim), generator=gen)
        return io.NodeOutput([[cond, {}]])


class CVXTestImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CVXTestImage",
            display_name="CVX Test Image (dev stand-in)",
            category="customvideox/dev",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Int.Input("width", default=64, min=8, max=4096),
                io.Int.Input("height", default=64, min=8, max=4096),
                io.Int.Input("batch_size", default=1, min=1, max=1024),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, seed: int, width: int, height: int, batch_size: int) -> io.NodeOutput:
        gen = torch.Generator().manual_seed(seed)
        # Upsampled low-res noise: smooth like a photo, so VAE round trips are meaningful.
        low = torch.rand((batch_size, 3, max(2, height // 8), max(2, width // 8)), generator=gen)
        img = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
        return io.NodeOutput(img.permute(0, 2, 3, 1).clamp(0.0, 1.0).contiguous())


class CVXTestSaveTensor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CVXTestSaveTensor",
            display_name="CVX Test Save Tensor (dev stand-in)",
            category="customvideox/dev",
            inputs=[
                io.AnyType.Input("value"),
                io.String.Input("name", default="tensor"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, value: object, name: str) -> io.NodeOutput:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
            raise ValueError(f"name must be a plain file name, got {name!r}")
        if isinstance(value, dict) and "samples" in value:  # LATENT
            value = value["samples"]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"CVXTestSaveTensor needs a tensor or LATENT, got {type(value).__name__}")
        folder = os.path.join(folder_paths.get_output_directory(), TENSOR_SUBFOLDER)
        os.makedirs(folder, exist_ok=True)
        filename = f"{name}.pt"
        torch.save(value.detach().cpu().clone(), os.path.join(folder, filename))
        saved = {"filename": filename, "subfolder": TENSOR_SUBFOLDER, "type": "output"}
        return io.NodeOutput(ui={"cvx_tensors": [saved]})


class CVXDevNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [CVXTestTextConditioning, CVXTestImage, CVXTestSaveTensor]


async def comfy_entrypoint() -> CVXDevNodes:
    return CVXDevNodes()

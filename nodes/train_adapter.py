"""CustomVideoXTrainAdapter: train a reference-branch adapter on a folder of clips, inside ComfyUI.

The host glue for :mod:`cvx_core.training`: the model is the host's ModelPatcher with the pack's
reference patch (two-way 3D reference attention) and the adapter's block patch, loaded through the
host's model management (device, dtype); the VAE and text encoder are the host's. Also used by
``scripts/train_adapter.py``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..cvx_core.dataset import PrepSettings
from ..cvx_core.lora import DEFAULT_TARGETS, TARGETS
from ..cvx_core.paths import is_relative_name, is_safe_file_name
from ..cvx_core.training import TRAIN_REFERENCE_TIMESTEPS, TrainSettings
from ..cvx_host.adapters import adapter_family
from ..cvx_host.training import host_encoders, module_fingerprint, train_on_host
from .types import CATEGORY

log = logging.getLogger("customvideox")

TARGET_SETS = {"attention (q,k,v,out)": DEFAULT_TARGETS, "attention + feed-forward": TARGETS}
TRAIN_SUBFOLDER = "customvideox_training"


def _base_model_name(model) -> str:
    init = getattr(model, "cached_patcher_init", None)
    args = init[1] if init and len(init) > 1 else ()
    return os.path.basename(str(args[0])) if args and isinstance(args[0], (str, os.PathLike)) else ""


def _relative_folder(name: str, what: str) -> str:
    if not is_relative_name(name.strip()):
        raise ValueError(f"CustomVideoXTrainAdapter: {what} {name!r} must be a folder name relative to ComfyUI's "
                         f"input folder, without '..' or an absolute path")
    return os.path.join(folder_paths.get_input_directory(), name.strip())


class CustomVideoXTrainAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXTrainAdapter",
            display_name="CustomVideoX Train Adapter",
            category=CATEGORY,
            description="Trains a CustomVideoX adapter (a LoRA on the reference tokens only; the base model stays "
                        "frozen) on a folder of clips under ComfyUI's input folder: NAME.mp4/.webm/.gif or a folder "
                        "of frames, NAME.txt caption, optional NAME.subject.txt and NAME.mask.png. Saves the "
                        "adapter to models/loras (for CustomVideoXAdapterLoader), checkpoints and a loss curve.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The CogVideoX or Wan text-to-video MODEL to train on (stays "
                                                "frozen). On Wan the reference is a leading frame, as "
                                                "CustomVideoXApply inserts it."),
                io.Vae.Input("vae", tooltip="Its VAE (encodes the clips and references once)."),
                io.Clip.Input("clip", tooltip="Its text encoder (CLIPLoader type cogvideox for CogVideoX, wan "
                                              "for Wan)."),
                io.String.Input("dataset_folder", default="customvideox_dataset",
                                tooltip="Folder of clips, relative to ComfyUI's input folder."),
                io.String.Input("subject", default="",
                                tooltip="Subject word for clips without a NAME.subject.txt (e.g. 'dog')."),
                io.String.Input("adapter_name", default="customvideox_adapter",
                                tooltip="File name (without extension) of the adapter saved in models/loras; "
                                        "also names the training folder (checkpoints, cache, loss.png) in output/."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Optimizer steps in total."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate."),
                io.Int.Input("rank", default=16, min=1, max=512, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.5,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank."),
                io.Combo.Input("targets", options=list(TARGET_SETS), default=next(iter(TARGET_SETS)),
                               tooltip="Which projections of the reference tokens the LoRA adapts."),
                io.Int.Input("width", default=720, min=16, max=4096, step=16,
                             tooltip="Training width in pixels (clips are centre-cropped to it)."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16,
                             tooltip="Training height in pixels (clips are centre-cropped to it)."),
                io.Int.Input("num_frames", default=49, min=1, max=1025, step=4,
                             tooltip="Frames per clip (4k+1); clips with fewer frames are an error."),
                io.Int.Input("frame_stride", default=1, min=1, max=64, tooltip="Take every n-th frame."),
                io.Float.Input("reference_drop", default=0.05, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability of a step with a blank (all-zero) reference."),
                io.Float.Input("text_drop", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability of a step with the empty caption (for CFG)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute block activations in backward: much less memory, ~30% slower."),
                io.Int.Input("checkpoint_every", default=250, min=0, max=1_000_000,
                             tooltip="Save a resumable checkpoint every N steps (0 = only when interrupted)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the latest checkpoint of this adapter_name, if any."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed for init, sampling and noise."),
                io.Combo.Input("reference_timestep", options=list(TRAIN_REFERENCE_TIMESTEPS), default="sampling",
                               optional=True,
                               tooltip="The reference's timestep during training (two-way): use the same value "
                                       "on CustomVideoXApply with the trained adapter. sampling: the clean "
                                       "reference at the training timestep; noised: the reference noised to it.",
                               advanced=True),
            ],
            outputs=[io.String.Output(display_name="adapter", tooltip="The saved adapter's name in models/loras."),
                     io.Image.Output(display_name="loss_curve", tooltip="The training loss per step.")],
        )

    @classmethod
    def execute(cls, model, vae, clip, dataset_folder: str, subject: str, adapter_name: str, steps: int,
                learning_rate: float, rank: int, alpha: float, targets: str, width: int, height: int,
                num_frames: int, frame_stride: int, reference_drop: float, text_drop: float,
                gradient_checkpointing: bool, checkpoint_every: int, resume: bool, seed: int,
                reference_timestep: str = "sampling") -> io.NodeOutput:
        adapter_family(model, "CustomVideoXTrainAdapter")
        if not is_safe_file_name(adapter_name):
            raise ValueError(f"CustomVideoXTrainAdapter: adapter_name {adapter_name!r} must be a plain file name "
                             f"(letters, digits, _ . -)")
        folder = _relative_folder(dataset_folder, "dataset_folder")
        out_dir = Path(folder_paths.get_output_directory()) / TRAIN_SUBFOLDER / adapter_name
        settings = TrainSettings(steps=steps, learning_rate=learning_rate, rank=rank, alpha=alpha,
                                 targets=TARGET_SETS[targets], seed=seed, reference_drop=reference_drop,
                                 text_drop=text_drop, gradient_checkpointing=gradient_checkpointing,
                                 checkpoint_every=checkpoint_every, reference_timestep=reference_timestep)
        prep = PrepSettings(width=width, height=height, num_frames=num_frames, frame_stride=frame_stride)
        pbar = comfy.utils.ProgressBar(steps)
        with torch.inference_mode(False):
            # The node runs under inference mode, whose weights cannot be saved for backward: the host's own
            # trainer reloads a plain copy the same way.
            if getattr(model, "cached_patcher_init", None) is None:
                raise ValueError("CustomVideoXTrainAdapter: this MODEL cannot be reloaded for training; load it "
                                 "with CustomVideoXModelLoader or UNETLoader")
            train_model = model.clone(force_deepcopy=True)
            encode_video, encode_text = host_encoders(train_model, vae, clip)
            result = train_on_host(train_model, encode_video, encode_text, folder, out_dir, settings, prep,
                                   subject=subject, base_model=_base_model_name(model), adapter_name=adapter_name,
                                   encoder_id=f"{module_fingerprint(vae.first_stage_model)}:"
                                              f"{module_fingerprint(clip.cond_stage_model)}", resume=resume,
                                   progress=lambda step, total, loss: pbar.update_absolute(step, total))
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        target = Path(loras_dir) / f"{adapter_name}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(result.adapter_path, target)
        curve = torch.from_numpy(np.asarray(_load_rgb(result.curve_path), dtype=np.float32) / 255.0)[None]
        log.info("CustomVideoX: adapter saved to %s (%d steps, last loss %.4g)", target, result.steps,
                 result.losses[-1] if result.losses else float("nan"))
        return io.NodeOutput(target.name, curve)


def _load_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")

"""CustomVideoXApply: a patched clone of a native CogVideoX MODEL with a reference in its attention."""

from __future__ import annotations

from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel
from comfy_api.latest import io

from ..cvx_core.reference_timestep import REFERENCE_TIMESTEPS
from ..cvx_core.rope import REF_ROPE_MODES
from .reference_patch import BIAS_ROWS, MODES, PatchError, ReferenceEntry, apply_reference
from .types import CATEGORY, CVXReference, CVXRegion, CVXSchedule, EncodedReference


def check_cogvideox_t2v(model, node: str = "CustomVideoXApply") -> CogVideoXTransformer3DModel:
    """The model's CogVideoX DiT, or a clear error (naming ``node``) for any other model."""
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, CogVideoXTransformer3DModel):
        raise PatchError(f"{node}: the MODEL is a {type(dm).__name__} "
                         f"({type(model.model).__name__}), not CogVideoX: load a CogVideoX transformer "
                         f"(CustomVideoXModelLoader or UNETLoader)")
    if dm.in_channels != dm.out_channels:
        raise PatchError(f"{node}: the MODEL is a CogVideoX that takes {dm.in_channels} input channels "
                         f"(image-to-video or inpainting); CustomVideoX needs a text-to-video CogVideoX "
                         f"({dm.out_channels} channels)")
    return dm


class CustomVideoXApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXApply",
            display_name="CustomVideoX Apply Reference",
            category=CATEGORY,
            description="Adds the reference to the CogVideoX model's 3D attention (a patched copy of the MODEL; "
                        "the input MODEL is unchanged). Chain several for several references.",
            inputs=[
                io.Model.Input("model", tooltip="A text-to-video CogVideoX MODEL."),
                CVXReference.Input("reference", tooltip="From CustomVideoXReferenceEncode."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Reference attention weight: bias log(strength). 1 = plain joint "
                                       "attention, 0 = reference off (the model is then exactly unpatched)."),
                CVXSchedule.Input("schedule", optional=True,
                                  tooltip="Optional TAB schedule: bias over sampling progress, added to strength's."),
                CVXRegion.Input("region", optional=True, tooltip="Optional ERAE region: extra bias where the "
                                                                 "subject is."),
                io.Int.Input("block_start", default=0, min=0, max=99,
                             tooltip="First DiT block that sees the reference.", advanced=True),
                io.Int.Input("block_end", default=-1, min=-1, max=99,
                             tooltip="Last DiT block that sees the reference (-1 = the last block).", advanced=True),
                io.Boolean.Input("apply_to_uncond", default=True,
                                 tooltip="Also give the reference to the negative (uncond) pass. Off makes CFG push "
                                         "towards the reference more strongly."),
                io.Combo.Input("attention_mode", options=list(MODES), default="two_way",
                               tooltip="two_way: reference tokens also attend to the video (the paper's joint "
                                       "3D attention); one_way: the reference attends to itself and the text only, "
                                       "in its own short pass (once per run with reference_timestep 'clean', "
                                       "else once per step)."),
                io.Combo.Input("reference_rope", options=list(REF_ROPE_MODES), default="negative",
                               tooltip="Temporal RoPE position of the reference: negative (before frame 0; keeps "
                                       "the video's own positions), shift (frame 0, video shifted), none.",
                               advanced=True),
                io.Combo.Input("bias_rows", options=list(BIAS_ROWS), default="all", optional=True, advanced=True,
                               tooltip="Which queries the strength/TAB bias reaches on the reference's keys: all "
                                       "(text, reference and video queries; default) or video (the video "
                                       "queries only). Reference off (strength 0, TAB off) always masks it "
                                       "from every query."),
                io.Combo.Input("reference_timestep", options=list(REFERENCE_TIMESTEPS), default="sampling", optional=True,
                               tooltip="The timestep the reference tokens are modulated with. sampling: the clean "
                                       "reference at the current sampling timestep (what adapters are trained "
                                       "with); noised: the reference noised to the current noise level with a "
                                       "fixed seed, like one more video frame ('reference-only', worth trying "
                                       "without an adapter); clean: timestep 0, one_way only.",
                               advanced=True),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, reference: EncodedReference, strength, block_start, block_end, apply_to_uncond,
                attention_mode, reference_rope, schedule=None, region=None, bias_rows="all",
                reference_timestep: str = "sampling") -> io.NodeOutput:
        dm = check_cogvideox_t2v(model)
        n_blocks = len(dm.blocks)
        end = n_blocks - 1 if block_end < 0 else block_end
        if not 0 <= block_start <= end < n_blocks:
            raise PatchError(f"CustomVideoXApply: block_start..block_end is {block_start}..{block_end}, which is "
                             f"not inside this model's blocks 0..{n_blocks - 1} (block_end -1 = the last block)")
        if region is not None and region.mode == "auto" and region.last_map_block >= end:
            blocks = f"map_block {region.map_block}" + (f" with map_blocks {region.map_blocks} (blocks "
                                                         f"{region.map_block}..{region.last_map_block})"
                                                         if region.map_blocks > 1 else "")
            raise PatchError(f"CustomVideoXApply: the region's {blocks} reaches block {region.last_map_block}, "
                             f"but the reference is used up to block {end} of 0..{n_blocks - 1}: the map's last "
                             f"block must be below {end} (lower map_block or map_blocks)")
        if bias_rows not in BIAS_ROWS:
            raise PatchError(f"CustomVideoXApply: bias_rows {bias_rows!r} is not one of {BIAS_ROWS}")
        if not isinstance(reference, EncodedReference):
            raise PatchError("CustomVideoXApply: 'reference' must come from CustomVideoXReferenceEncode")
        latent = reference.latent
        channels = model.get_model_object("latent_format").latent_channels
        if latent.ndim != 5 or latent.shape[1] != channels:
            raise PatchError(f"CustomVideoXApply: the reference latent has shape {tuple(latent.shape)}; this model "
                             f"needs {channels}-channel video latents from its CogVideoX VAE")
        latent = model.get_model_object("latent_format").process_in(latent[:, :, :1].float())
        if dm.patch_size_t:
            # CogVideoX 1.5 patches 2 latent frames together: the still reference fills both.
            latent = latent.repeat(1, 1, dm.patch_size_t, 1, 1)
        entry = ReferenceEntry(latent=latent, strength=strength, schedule=schedule, region=region,
                               block_start=block_start, block_end=block_end, apply_to_uncond=apply_to_uncond,
                               mode=attention_mode, ref_rope=reference_rope, bias_rows=bias_rows,
                               reference_timestep=reference_timestep)
        return io.NodeOutput(apply_reference(model, entry))

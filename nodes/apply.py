"""CustomVideoXApply: a patched clone of a native CogVideoX MODEL with a reference in its attention."""

from __future__ import annotations

from comfy_api.latest import io

from ..cvx_core.reference_timestep import REFERENCE_TIMESTEPS
from ..cvx_core.rope import REF_ROPE_MODES
from ..cvx_host.backbone import backbone_for, check_reference_family
from ..cvx_host.cogvideox import CogVideoX
from ..cvx_host.entries import ATTENTION_PATHS, BIAS_ROWS, MODES, ReferenceEntry, check_blocks
from ..cvx_host.errors import PatchError
from ..cvx_host.reference_patch import apply_reference
from ..cvx_host.wan import Wan
from ..cvx_host.wan_insert import apply_wan_reference
from .types import CATEGORY, CVXReference, CVXRegion, CVXSchedule, EncodedReference


class CustomVideoXApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXApply",
            display_name="CustomVideoX Apply Reference",
            category=CATEGORY,
            description="Adds the reference to the model's 3D attention: CogVideoX (joint text+video attention) or Wan "
                        "2.1 text-to-video (the video's self-attention), two-way or one-way (a patched copy of the "
                        "MODEL; the input MODEL is unchanged). Chain several for several references.",
            inputs=[
                io.Model.Input("model", tooltip="A text-to-video CogVideoX (1.0/1.5) or Wan 2.1 text-to-video MODEL. For Wan "
                                                "Phantom/VACE graphs use CustomVideoXReferenceFramesBias."),
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
                                       "3D attention); one_way: the reference attends to itself (and the text) only, "
                                       "in its own short pass whose keys the video reads (once per run with "
                                       "reference_timestep 'clean', else once per step). Wan VACE: two_way only."),
                io.Combo.Input("reference_rope", options=list(REF_ROPE_MODES), default="negative",
                               tooltip="Temporal RoPE position of the reference: negative (before frame 0; keeps "
                                       "the video's own positions), shift (frame 0, video shifted; on Wan the same "
                                       "as negative), none (CogVideoX: unrotated; Wan: frame 0's index), after (Wan "
                                       "only: after the last frame, where Phantom puts its references).",
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
                                       "without an adapter); clean: timestep 0, one_way only (then computed once "
                                       "per run).",
                               advanced=True),
                io.Combo.Input("attention_path", options=list(ATTENTION_PATHS), default="mask", optional=True,
                               advanced=True,
                               tooltip="How the biased attention is computed. mask: the host's attention with a "
                                       "key-column mask (default; any attention backend). lse: unmasked fused "
                                       "attention calls merged by log-sum-exp, the same result, keeps GPU flash "
                                       "kernels (bypasses the host's attention choice; not yet measured on a GPU)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, reference: EncodedReference, strength, block_start, block_end, apply_to_uncond,
                attention_mode, reference_rope, schedule=None, region=None, bias_rows="all",
                reference_timestep: str = "sampling", attention_path: str = "mask") -> io.NodeOutput:
        if not isinstance(reference, EncodedReference):
            raise PatchError("CustomVideoXApply reference: it must come from CustomVideoXReferenceEncode")
        backbone = backbone_for(model, "CustomVideoXApply")
        check_reference_family(backbone, reference.family, "CustomVideoXApply")
        if isinstance(backbone, Wan):
            return io.NodeOutput(apply_wan_reference(
                model, reference.latent, strength=strength, schedule=schedule, region=region, block_start=block_start,
                block_end=block_end, apply_to_uncond=apply_to_uncond, attention_mode=attention_mode,
                reference_rope=reference_rope, bias_rows=bias_rows, reference_timestep=reference_timestep,
                attention_path=attention_path))
        backbone = CogVideoX.for_model(model, "CustomVideoXApply")
        if bias_rows not in BIAS_ROWS:
            raise PatchError(f"CustomVideoXApply bias_rows: {bias_rows!r} is not one of {BIAS_ROWS}")
        entry = ReferenceEntry(latent=backbone.prepare_reference(model, reference.latent, "CustomVideoXApply"),
                               strength=strength, schedule=schedule, region=region, block_start=block_start,
                               block_end=block_end, apply_to_uncond=apply_to_uncond, mode=attention_mode,
                               ref_rope=reference_rope, bias_rows=bias_rows, reference_timestep=reference_timestep,
                               attention_path=attention_path)
        check_blocks(backbone.num_blocks, entry, "CustomVideoXApply")
        return io.NodeOutput(apply_reference(model, entry))

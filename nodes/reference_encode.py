"""CustomVideoXReferenceEncode: reference image(s) -> CogVideoX or Wan VAE latents."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..cvx_core.reference_image import CROPS, FILLS, FITS, ReferenceImageError, prepare_reference
from .types import CATEGORY, CVXReference, EncodedReference

# The host's VAE model modules (comfy/sd.py builds each from its file's keys) -> the latent family.
# Wan 2.2 A14B samples in the Wan 2.1 VAE's latent; only TI2V-5B uses the 48-channel Wan 2.2 VAE.
VAE_FAMILIES = {
    "comfy.ldm.cogvideo.vae": "CogVideoX",
    "comfy.ldm.wan.vae": "Wan2.1",
    "comfy.ldm.wan.vae2_2": "Wan2.2",
}
ACCEPTED_VAES = ("the CogVideoX VAE (for CogVideoX 1.0/1.5), the Wan 2.1 VAE (wan_2.1_vae; for Wan 2.1 and "
                 "Wan 2.2 A14B) or the Wan 2.2 VAE (wan2.2_vae; for Wan 2.2 TI2V-5B)")


def vae_family(vae) -> str:
    """The latent family of a host VAE, or a ValueError naming the node, the input and the accepted VAEs."""
    fsm = getattr(vae, "first_stage_model", None)
    module = type(fsm).__module__
    if module in VAE_FAMILIES:
        return VAE_FAMILIES[module]
    what = f"{module}.{type(fsm).__name__}" if fsm is not None else type(vae).__name__
    raise ValueError(f"CustomVideoXReferenceEncode vae: {what} is not a CogVideoX VAE nor a Wan VAE; load "
                     f"{ACCEPTED_VAES}: the VAE that decodes the video")


class CustomVideoXReferenceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXReferenceEncode",
            display_name="CustomVideoX Reference Encode",
            category=CATEGORY,
            description="Encodes the subject's reference image(s) with the video's VAE (CogVideoX, Wan 2.1 or "
                        "Wan 2.2), one latent frame per image, at the video's size. A batch of images gives "
                        "several references.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE that decodes the video: CogVideoX's, the Wan 2.1 VAE (Wan 2.1, "
                                            "Wan 2.2 A14B) or the Wan 2.2 VAE (TI2V-5B)."),
                io.Image.Input("image", tooltip="The subject's reference image; a batch = several references. RGBA: "
                                                "the alpha is the subject mask when no mask is connected; "
                                                "grayscale and 0-255 values are converted."),
                io.Int.Input("width", default=720, min=16, max=4096, step=16,
                             tooltip="Video width in pixels (multiple of 16); the reference is fitted to it."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16,
                             tooltip="Video height in pixels (multiple of 16); the reference is fitted to it."),
                io.Combo.Input("fit", options=list(FITS), default="pad",
                               tooltip="pad: keep the whole subject and fill the borders; crop: fill the frame, "
                                       "cutting edges; stretch: ignore the aspect ratio."),
                io.Combo.Input("background", options=list(FILLS), default="white",
                               tooltip="With a mask (or alpha): what replaces the background; white = the "
                                       "subject cut out on white, as adapters are trained (the paper uses the "
                                       "segmented subject); keep = ignore the mask's outline. Also the padding "
                                       "colour (grey when 'keep')."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional subject mask (1 = subject), one or one per image. LoadImage's "
                                      "MASK is 1 on transparent pixels: invert it (InvertMask) first."),
                io.Combo.Input("subject_crop", options=list(CROPS), default="subject", optional=True,
                               tooltip="With a mask (or alpha): subject = crop to the subject's box plus a 10% "
                                       "margin before fitting (as training does, so the subject fills the "
                                       "frame); none = fit the whole image.", advanced=True),
            ],
            outputs=[
                CVXReference.Output(display_name="reference"),
                io.Image.Output(display_name="encoded_image", tooltip="Exactly the pixels that were encoded."),
            ],
        )

    @classmethod
    def execute(cls, vae, image, width, height, fit, background, mask=None,
                subject_crop: str = "subject") -> io.NodeOutput:
        if image is None or image.shape[0] == 0:
            raise ValueError("CustomVideoXReferenceEncode: the image batch is empty: connect a reference image")
        if width % 16 or height % 16:
            raise ValueError(f"CustomVideoXReferenceEncode: width x height is {width}x{height}; both must be "
                             f"multiples of 16 (e.g. 720x480)")
        family = vae_family(vae)
        try:
            pixels = prepare_reference(image, mask, width, height, fit, background, subject_crop)
        except ReferenceImageError as e:
            raise ValueError(f"CustomVideoXReferenceEncode: {e}") from e
        latent = torch.cat([vae.encode(pixels[i:i + 1]) for i in range(pixels.shape[0])], dim=0)
        return io.NodeOutput(EncodedReference(latent=latent.cpu(), width=width, height=height, family=family), pixels)

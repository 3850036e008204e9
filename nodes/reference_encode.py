"""CustomVideoXReferenceEncode: reference image(s) -> CogVideoX VAE latents."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..cvx_core.reference_image import CROPS, FILLS, FITS, ReferenceImageError, prepare_reference
from .types import CATEGORY, CVXReference, EncodedReference


class CustomVideoXReferenceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXReferenceEncode",
            display_name="CustomVideoX Reference Encode",
            category=CATEGORY,
            description="Encodes the subject's reference image(s) with the CogVideoX VAE, at the video's size. "
                        "A batch of images gives several references.",
            inputs=[
                io.Vae.Input("vae", tooltip="The CogVideoX VAE (the same one that decodes the video)."),
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
        fsm = getattr(vae, "first_stage_model", None)
        if "cogvideo" not in type(fsm).__module__:
            raise ValueError(f"CustomVideoXReferenceEncode: this is not a CogVideoX VAE "
                             f"({type(fsm).__module__}.{type(fsm).__name__}); load the CogVideoX VAE")
        try:
            pixels = prepare_reference(image, mask, width, height, fit, background, subject_crop)
        except ReferenceImageError as e:
            raise ValueError(f"CustomVideoXReferenceEncode: {e}") from e
        latent = torch.cat([vae.encode(pixels[i:i + 1]) for i in range(pixels.shape[0])], dim=0)
        return io.NodeOutput(EncodedReference(latent=latent.cpu(), width=width, height=height), pixels)

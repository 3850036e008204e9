"""CustomVideoXReferenceEncode: reference image(s) -> CogVideoX VAE latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from .types import CATEGORY, CVXReference, EncodedReference

FILLS = {"keep": None, "white": 1.0, "grey": 0.5, "black": 0.0}
FITS = ("pad", "crop", "stretch")


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # img [N, C, H, W]; area for shrinking, bilinear for enlarging.
    mode = "area" if h <= img.shape[-2] and w <= img.shape[-1] else "bilinear"
    return F.interpolate(img, size=(h, w), mode=mode, **({} if mode == "area" else {"align_corners": False}))


def fit_image(img: torch.Tensor, width: int, height: int, fit: str, pad_value: float) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, height, width]`` by stretch, centre crop or centre pad."""
    if fit not in FITS:
        raise ValueError(f"fit {fit!r} is not one of {FITS}")
    h, w = img.shape[-2:]
    if fit == "stretch":
        return _resize(img, height, width)
    scale = (max if fit == "crop" else min)(height / h, width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = _resize(img, nh, nw)
    if fit == "crop":
        top, left = (nh - height) // 2, (nw - width) // 2
        return img[..., top:top + height, left:left + width]
    top, left = (height - nh) // 2, (width - nw) // 2
    return F.pad(img, (left, width - nw - left, top, height - nh - top), value=pad_value)


def _mask_for(mask: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    if mask.ndim == 2:
        mask = mask[None]
    if mask.shape[0] not in (1, n):
        raise ValueError(f"the mask batch has {mask.shape[0]} masks for {n} reference images: give one mask, "
                         f"or one per image")
    mh, mw = mask.shape[-2:]
    if (mh, mw) != (h, w):
        if abs(mh / mw - h / w) > 0.01 * (h / w):
            raise ValueError(f"the mask is {mw}x{mh} but the reference image is {w}x{h}: the aspect ratios differ, "
                             f"so the mask cannot be mapped; give a mask made from this image")
        mask = F.interpolate(mask[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    if not bool((mask > 0).any()):
        raise ValueError("the subject mask is empty (all zeros): paint the subject, or leave the mask unconnected")
    return mask.expand(n, -1, -1).clamp(0, 1)


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
                io.Image.Input("image", tooltip="The subject's reference image; a batch = several references."),
                io.Int.Input("width", default=720, min=16, max=4096, step=16,
                             tooltip="Video width in pixels (multiple of 16); the reference is fitted to it."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16,
                             tooltip="Video height in pixels (multiple of 16); the reference is fitted to it."),
                io.Combo.Input("fit", options=list(FITS), default="pad",
                               tooltip="pad: keep the whole subject and fill the borders; crop: fill the frame, "
                                       "cutting edges; stretch: ignore the aspect ratio."),
                io.Combo.Input("background", options=list(FILLS), default="keep",
                               tooltip="With a mask: what replaces the background (the paper uses the segmented "
                                       "subject). Also the padding colour (grey when 'keep')."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional subject mask (1 = subject), one or one per image."),
            ],
            outputs=[
                CVXReference.Output(display_name="reference"),
                io.Image.Output(display_name="encoded_image", tooltip="Exactly the pixels that were encoded."),
            ],
        )

    @classmethod
    def execute(cls, vae, image, width, height, fit, background, mask=None) -> io.NodeOutput:
        if image is None or image.shape[0] == 0:
            raise ValueError("CustomVideoXReferenceEncode: the image batch is empty: connect a reference image")
        if width % 16 or height % 16:
            raise ValueError(f"CustomVideoXReferenceEncode: width x height is {width}x{height}; both must be "
                             f"multiples of 16 (e.g. 720x480)")
        if not bool(torch.isfinite(image).all()):
            raise ValueError("CustomVideoXReferenceEncode: the reference image contains NaN or inf values: "
                             "check the node that made it")
        fsm = getattr(vae, "first_stage_model", None)
        if "cogvideo" not in type(fsm).__module__:
            raise ValueError(f"CustomVideoXReferenceEncode: this is not a CogVideoX VAE "
                             f"({type(fsm).__module__}.{type(fsm).__name__}); load the CogVideoX VAE")
        img = image[..., :3].movedim(-1, 1).float()
        n, _, h, w = img.shape
        fill = FILLS[background]
        if mask is not None:
            try:
                m = _mask_for(mask.to(img.device), n, h, w)[:, None]
            except ValueError as e:
                raise ValueError(f"CustomVideoXReferenceEncode: mask: {e}") from e
            if fill is not None:
                img = img * m + fill * (1 - m)
        img = fit_image(img, width, height, fit, 0.5 if fill is None else fill).clamp(0, 1)
        pixels = img.movedim(1, -1)
        latent = torch.cat([vae.encode(pixels[i:i + 1]) for i in range(n)], dim=0)
        return io.NodeOutput(EncodedReference(latent=latent.cpu(), width=width, height=height), pixels)

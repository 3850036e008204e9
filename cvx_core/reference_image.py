"""Reference image preprocessing, one function for inference and training. Host-free (torch only).

:func:`prepare_reference` turns what a user connects (a ComfyUI ``IMAGE`` batch and an optional
``MASK``) into the exact pixels the VAE encodes. Training's reference (the subject cut out of a
clip's first frame, cvx_core/dataset.py) goes through the same function with the same defaults, so
an adapter sees at inference what it was trained on:

1. inputs are normalised: 0-255 values are scaled to 0-1, grayscale becomes RGB, an alpha channel
   becomes the subject mask when no mask is given; anything ambiguous is an error naming the input;
2. with a mask, the background is replaced by ``background`` (white by default) and, with
   ``crop="subject"``, the image is cropped to the subject's box plus ``margin`` of its size
   ([reconstructed] training's crop: the subject's scale and place differ from the clip's first frame,
   so an adapter cannot learn to copy it);
3. the result is fitted to ``width`` x ``height`` (pad, crop or stretch) with antialiased bicubic
   resampling (PIL's filter), padding with the background colour (grey for ``keep``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .image_ops import has_subject, same_aspect

FILLS: dict[str, float | None] = {"keep": None, "white": 1.0, "grey": 0.5, "black": 0.0}
FITS = ("pad", "crop", "stretch")
CROPS = ("subject", "none")
SUBJECT_MARGIN = 0.1
_KEEP_PAD = 0.5


class ReferenceImageError(ValueError):
    """A user-facing input problem; the message starts with the input's name (``image:`` / ``mask:``)."""


def _unit_range(x: torch.Tensor, what: str) -> torch.Tensor:
    """Values as floats in 0..1: integer tensors and float values above 1.5 are read as 0-255."""
    if x.dtype == torch.bool:
        return x.float()
    if not x.is_floating_point():
        return x.float() / 255.0
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ReferenceImageError(f"{what}: contains NaN or inf values; check the node that made it")
    lo, hi = float(x.min()), float(x.max())
    if lo < -0.5 or hi > 255.5:
        raise ReferenceImageError(f"{what}: values run from {lo:g} to {hi:g}; expected 0..1 (ComfyUI images) or "
                                  f"0..255 (for -1..1 values, map them to 0..1 with (x + 1) / 2 first)")
    if hi > 1.5:  # no 0..1 image reaches 1.5; an 8-bit one almost always does
        x = x / 255.0
    return x.clamp(0.0, 1.0)


def split_image(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``IMAGE`` ``[N, H, W, C]`` -> RGB ``[N, 3, H, W]`` in 0..1 and the alpha ``[N, H, W]`` (or None).

    C = 1 (grayscale) and 2 (grayscale + alpha) are expanded to RGB; C = 4 carries an alpha channel.
    """
    if image.ndim != 4:
        raise ReferenceImageError(f"image: has shape {tuple(image.shape)}; expected a ComfyUI IMAGE "
                                  f"[batch, height, width, channels]")
    n, h, w, c = image.shape
    if n == 0 or h == 0 or w == 0:
        raise ReferenceImageError("image: the image batch is empty; connect a reference image")
    if c not in (1, 2, 3, 4):
        raise ReferenceImageError(f"image: has {c} channels; expected RGB (3), RGBA (4), grayscale (1) or "
                                  f"grayscale + alpha (2)")
    x = _unit_range(image, "image").movedim(-1, 1)
    colour = x[:, :3] if c >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    alpha = x[:, c - 1] if c in (2, 4) else None
    return colour, alpha


def _mask_batch(mask: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """A ``MASK`` as ``[n, h, w]`` in 0..1: one mask for every image or one per image."""
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ReferenceImageError(f"mask: has shape {tuple(mask.shape)}; expected a ComfyUI MASK [batch, height, "
                                  f"width]")
    mask = _unit_range(mask, "mask")
    if mask.shape[0] not in (1, n):
        raise ReferenceImageError(
            f"mask: {mask.shape[0]} masks for {n} reference image(s); connect one mask, or one per image (for "
            f"several subjects of one photo, repeat the image with RepeatImageBatch; to join masks into one, use "
            f"MaskComposite)")
    mh, mw = mask.shape[-2:]
    if (mh, mw) != (h, w):
        if not same_aspect((mh, mw), (h, w)):
            raise ReferenceImageError(f"mask: is {mw}x{mh} but the image is {w}x{h}; the aspect ratios differ, so "
                                      f"the mask cannot be mapped; give a mask made from this image")
        mask = F.interpolate(mask[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
    if not has_subject(mask):
        raise ReferenceImageError("mask: the subject mask is empty (all zeros); paint the subject, or leave the "
                                  "mask unconnected")
    return mask.expand(n, -1, -1)


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(img, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)


def fit_image(img: torch.Tensor, width: int, height: int, fit: str, pad_value: float) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, height, width]`` by stretch, centre crop or centre pad."""
    if fit not in FITS:
        raise ValueError(f"fit {fit!r} is not one of {FITS}")
    h, w = img.shape[-2:]
    if fit == "stretch":
        return _resize(img, height, width)
    scale = (max if fit == "crop" else min)(height / h, width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = _resize(img, nh, nw) if (nh, nw) != (h, w) else img
    if fit == "crop":
        top, left = (nh - height) // 2, (nw - width) // 2
        return img[..., top:top + height, left:left + width]
    top, left = (height - nh) // 2, (width - nw) // 2
    return F.pad(img, (left, width - nw - left, top, height - nh - top), value=pad_value)


def subject_box(mask: torch.Tensor, margin: float) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the subject (mask >= half its peak) plus ``margin`` of its size."""
    ys, xs = torch.nonzero(mask >= 0.5 * float(mask.max()), as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    my, mx = int((y1 - y0) * margin), int((x1 - x0) * margin)
    h, w = mask.shape
    return max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)


def prepare_reference(image: torch.Tensor, mask: torch.Tensor | None, width: int, height: int, fit: str = "pad",
                      background: str = "white", crop: str = "subject",
                      margin: float = SUBJECT_MARGIN) -> torch.Tensor:
    """The pixels to encode, ``[N, height, width, 3]`` in 0..1, for ``image`` ``[N, H, W, C]`` and an optional
    subject ``mask`` (1 = subject; ``[H, W]``, ``[1|N, H, W]``). Without a mask, a non-opaque alpha channel
    is the mask. See the module docstring for the steps."""
    if background not in FILLS:
        raise ValueError(f"background {background!r} is not one of {tuple(FILLS)}")
    if crop not in CROPS:
        raise ValueError(f"crop {crop!r} is not one of {CROPS}")
    colour, alpha = split_image(image)
    n, _, h, w = colour.shape
    if mask is None and alpha is not None and bool((alpha < 1.0).any()):
        if not bool((alpha > 0).any()):
            raise ReferenceImageError("image: its alpha channel is fully transparent, so it shows no subject; use an "
                                      "image with the subject opaque, or drop the alpha channel")
        mask = alpha
    fill = FILLS[background]
    pad = _KEEP_PAD if fill is None else fill
    if mask is None:
        return fit_image(colour, width, height, fit, pad).movedim(1, -1)
    m = _mask_batch(mask.to(colour.device), n, h, w)
    out = []
    for img, mi in zip(colour, m):
        if fill is not None:
            img = img * mi + fill * (1.0 - mi)
        if crop == "subject":
            top, bottom, left, right = subject_box(mi, margin)
            img = img[:, top:bottom, left:right]
        out.append(fit_image(img[None], width, height, fit, pad))
    return torch.cat(out).movedim(1, -1)

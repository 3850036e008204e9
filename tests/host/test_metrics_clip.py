"""CLIP-I with the host's CLIP vision model (a tiny random one built at test time)."""

from __future__ import annotations

import pytest
import torch
from customvideox.cvx_core import metrics as M  # noqa: E402
from images import subject_photo


def _tiny_clip_vision():
    """A random ViT CLIP vision model built by the host's own ClipVisionModel (the CLIP_VISION type);
    the ``host`` fixture has made the host importable."""
    import comfy.clip_vision

    cfg = {"hidden_size": 32, "image_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
           "num_channels": 3, "num_hidden_layers": 2, "patch_size": 16, "projection_dim": 16,
           "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "model_type": "clip_vision_model"}
    cv = comfy.clip_vision.ClipVisionModel(cfg)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=gen) * 0.05 + (1.0 if k.endswith("weight") and v.ndim == 1 else 0.0)
          for k, v in cv.get_sd().items()}
    cv.load_sd(sd)
    return cv


def test_clip_vision_gives_clip_i_and_labels_it(host) -> None:
    cv = _tiny_clip_vision()
    cat = subject_photo("skimage:chelsea")
    video = cat[None].repeat(3, 1, 1, 1)
    res = M.evaluate_video(video, cat, clip_vision=cv, options=M.EvalOptions(mask_source="none", max_frames=3))
    assert res["clip_i"].value == pytest.approx(1.0, abs=1e-4)
    assert res["clip_i"].label == "CLIP-I (clip_vision_model, 16-d)"
    assert res["temporal_consistency"].label == "temporal consistency (clip_vision_model, 16-d)"
    assert res["dino_i"].value is None and res["clip_t"].value is None

"""The independent peer for reference attention: diffusers' own RoPE builder and an attention processor
written here, so no position or bias of the pack's code (cvx_core.rope, cvx_core.reference_attention) is on
the oracle's side.

Reference positions: the default placement gives the reference temporal index -1 (before the video, whose
frames keep 0..T-1). diffusers builds tables for indices 0..T-1 only; a rotary angle is ``position *
frequency``, so index -1's row is index 1's with every temporal angle negated: the same cosines, and the
temporal channels' sines negated. diffusers lays the channels out as ``[temporal | height | width]`` with
``head_dim // 4`` temporal channels (checked on the table itself: at index 0 exactly those sines are 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid


def with_reference_at_minus_one(table: tuple[torch.Tensor, torch.Tensor], per_frame: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``(cos, sin)`` table for token frames 0..T-1 (T >= 2, ``per_frame`` rows each) with one
    reference token frame at temporal index -1 put in front: ``[reference | video]`` rows."""
    cos, sin = table
    dim_t = cos.shape[1] // 4
    frame0, frame1 = slice(0, per_frame), slice(per_frame, 2 * per_frame)
    assert cos.shape[0] >= 2 * per_frame, "need at least 2 video token frames"
    assert bool((sin[frame0, :dim_t] == 0).all()) and bool((sin[frame0, dim_t:] != 0).any()), \
        "diffusers' channel layout is not [temporal (head_dim/4) | spatial]"
    ref_sin = sin[frame1].clone()
    ref_sin[:, :dim_t] = -ref_sin[:, :dim_t]
    return torch.cat([cos[frame1], cos]), torch.cat([ref_sin, sin])


class Processor:
    """A diffusers CogVideoX attention processor: the joint ``[text | image]`` attention with RoPE on the image
    rows, whose attention is ``fn(q, k, v)`` on ``[B, H, S, D]``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, attn.heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = torch.cat([q[:, :, :text], apply_rotary_emb(q[:, :, text:], image_rotary_emb)], dim=2)
        k = torch.cat([k[:, :, :text], apply_rotary_emb(k[:, :, text:], image_rotary_emb)], dim=2)
        out = attn.to_out[0](self.fn(q, k, v).transpose(1, 2).reshape(b, s, -1))
        return out[:, text:], out[:, :text]


class ReferenceBiasProcessor(Processor):
    """:class:`Processor` with ``bias`` added to the logits of every query on the first ``ref_tokens`` image
    keys (the reference): the text's length is read from the call."""

    def __init__(self, bias: float, ref_tokens: int) -> None:
        super().__init__(self._biased)
        self.bias, self.ref_tokens, self.text = bias, ref_tokens, 0

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        self.text = encoder_hidden_states.shape[1]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def _biased(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(1, 1, 1, k.shape[2], dtype=q.dtype)
        mask[..., self.text:self.text + self.ref_tokens] = self.bias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def diffusers_rope(config, grid: tuple[int, int], token_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE exactly as diffusers' CogVideoX pipeline builds it (``_prepare_rotary_positional_embeddings``) for
    a ``token_frames x grid`` token grid of a CogVideoX ``config``: 1.0 crops to its sample size, 1.5 slices."""
    p, p_t = config.patch_size, config.patch_size_t
    base_w, base_h = config.sample_width // p, config.sample_height // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
        return get_3d_rotary_pos_embed(config.attention_head_dim, crops, grid, token_frames)
    return get_3d_rotary_pos_embed(config.attention_head_dim, None, grid, token_frames, grid_type="slice",
                                   max_size=(base_h, base_w))

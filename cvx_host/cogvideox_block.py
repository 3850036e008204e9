"""Reference-branch LoRA on the host's native CogVideoX blocks (DESIGN.md §1.4, §2).

The host's ``CogVideoXBlock.forward`` projects the whole joint ``[text | image]`` sequence with one
weight per projection, so a LoRA that must touch reference tokens only cannot be a weight patch.
Instead each block's class is swapped, through an object patch of ``diffusion_model.blocks.N.__class__``
(applied and undone by the host's own patch/unpatch, per clone), for a subclass whose ``forward``

* calls the host's own forward unchanged whenever there are no reference rows to adapt (no
  reference, reference off, one-way main pass) — so with the reference off the model is exactly
  the base model, bit for bit;
* otherwise computes the same maths with ``scale * up @ down @ x`` added to the chosen projections
  (q, k, v, attn_out, ff_proj, ff_out) on the reference rows only: the first ``layout.ref_total``
  image tokens in two-way mode (the call's :class:`.forward_state.ForwardState`) or every
  image token in one-way mode's reference pass (:data:`.options.REFERENCE_STREAM_KEY`).

Why a class swap rather than an object patch of ``blocks.N.forward``: a patched ``forward`` is a plain
callable without ``self``, so it would have to hold the block module, and the host sometimes applies
a clone's object patches to another copy of the model (non-dynamic delegates, torch.compile, multi-GPU
deep clones); a class carries no module reference, so it is right on any copy. The base projections
still run through the host's modules, so weight patches (the host's LoRA loaders, this pack's global
mode) and its low-VRAM casting keep working, in either order.

The adapters live in the model options (:data:`.options.ADAPTERS_KEY`, a list: loaders stack); the
copied host block forward is pinned to the host version by tests/host/test_backbone_contract.py.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from comfy.ldm.cogvideo.model import CogVideoXBlock, apply_rotary_emb
from comfy.ldm.modules.attention import optimized_attention

from ..cvx_core.lora import TARGETS
from . import options


def reference_rows(opts: dict, text: int, seq: int) -> tuple[int, int] | None:
    """The ``[start, end)`` rows of the joint sequence that are reference tokens in this block call."""
    if options.in_reference_stream(opts):
        return text, seq
    state = options.forward_state(opts)
    if state is None or not state.layout.refs_in_queries or state.layout.ref_total == 0:
        return None
    return text, text + state.layout.ref_total


class ReferenceLoraBlock(CogVideoXBlock):
    """The host's block with reference-branch LoRA deltas; ``block_index`` is set per subclass."""

    block_index = -1

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, transformer_options=None):
        opts = transformer_options or {}
        text, seq = encoder_hidden_states.size(1), encoder_hidden_states.size(1) + hidden_states.size(1)
        rows = reference_rows(opts, text, seq)
        pairs = self._pairs(opts) if rows is not None else []
        if not pairs:
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, transformer_options)
        state = options.forward_state(opts)
        if options.checkpointing(opts) and torch.is_grad_enabled() and not options.in_reference_stream(opts):
            start = state.block if state is not None else 0

            def run(hs, enc, tb):
                # The attention override counts blocks on the shared state: a recompute must see this block's count.
                if state is not None:
                    state.restart_block(start)
                return self._adapted_forward(hs, enc, tb, image_rotary_emb, opts, rows, pairs)

            return torch.utils.checkpoint.checkpoint(run, hidden_states, encoder_hidden_states, temb,
                                                     use_reentrant=False)
        return self._adapted_forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, opts, rows, pairs)

    def _pairs(self, opts: dict) -> list[tuple[dict, float]]:
        out = []
        for use in options.adapters(opts):
            found = {t: p for t in TARGETS if (p := use.lora.get(f"blocks.{self.block_index}.{t}")) is not None}
            if found and use.strength != 0:
                out.append((found, use.strength))
        return out

    def _proj(self, name: str, x: torch.Tensor, rows: tuple[int, int], pairs) -> torch.Tensor:
        y = getattr(self, name)(x)
        a, b = rows
        delta = None
        for found, strength in pairs:
            p = found.get(name)
            if p is not None:
                d = p.delta(x[:, a:b], strength).to(y.dtype)
                delta = d if delta is None else delta + d
        if delta is None:
            return y
        return torch.cat([y[:, :a], y[:, a:b] + delta, y[:, b:]], dim=1)

    def _adapted_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, opts, rows, pairs):
        # The host's CogVideoXBlock.forward (v0.30.0), with self._proj in place of each projection.
        text_seq_length = encoder_hidden_states.size(1)
        norm_hidden, norm_encoder, gate_msa, enc_gate_msa = self.norm1(hidden_states, encoder_hidden_states, temb)
        qkv_input = torch.cat([norm_encoder, norm_hidden], dim=1)
        b, s, _ = qkv_input.shape
        n, d = self.num_heads, self.head_dim
        q = self._proj("q", qkv_input, rows, pairs).view(b, s, n, d)
        k = self._proj("k", qkv_input, rows, pairs).view(b, s, n, d)
        v = self._proj("v", qkv_input, rows, pairs)
        q = self.norm_q(q).view(b, s, n, d)
        k = self.norm_k(k).view(b, s, n, d)
        if image_rotary_emb is not None:
            q_img = apply_rotary_emb(q[:, text_seq_length:].transpose(1, 2), image_rotary_emb)
            k_img = apply_rotary_emb(k[:, text_seq_length:].transpose(1, 2), image_rotary_emb)
            q = torch.cat([q[:, :text_seq_length], q_img.transpose(1, 2)], dim=1)
            k = torch.cat([k[:, :text_seq_length], k_img.transpose(1, 2)], dim=1)
        attn_out = optimized_attention(q.reshape(b, s, n * d), k.reshape(b, s, n * d), v, heads=self.num_heads,
                                       transformer_options=opts)
        attn_out = self._proj("attn_out", attn_out, rows, pairs)
        attn_encoder, attn_hidden = attn_out.split([text_seq_length, s - text_seq_length], dim=1)
        hidden_states = hidden_states + gate_msa * attn_hidden
        encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_encoder
        norm_hidden, norm_encoder, gate_ff, enc_gate_ff = self.norm2(hidden_states, encoder_hidden_states, temb)
        ff_input = torch.cat([norm_encoder, norm_hidden], dim=1)
        ff_hidden = F.gelu(self._proj("ff_proj", ff_input, rows, pairs), approximate="tanh")
        ff_output = self._proj("ff_out", ff_hidden, rows, pairs)
        hidden_states = hidden_states + gate_ff * ff_output[:, text_seq_length:]
        encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff_output[:, :text_seq_length]
        return hidden_states, encoder_hidden_states


@functools.cache
def block_class(index: int) -> type[ReferenceLoraBlock]:
    """The block subclass for block ``index`` (one class per index, so patches compare equal)."""
    return type(f"ReferenceLoraBlock{index}", (ReferenceLoraBlock,), {"block_index": index,
                                                                     "__module__": __name__})


"""Reference-branch LoRA on the host's native Wan blocks (``comfy.ldm.wan.model``), with no host code copied.

Which modules: every per-token projection a Wan block applies to the reference tokens' rows — the
self-attention's q, k, v, o, the text cross-attention's q and o (the reference's own query to the text and
its output), and the FFN (``ffn.0``, ``ffn.2``): :data:`cvx_core.lora.WAN_REFERENCE_MODULES`. The
cross-attention's k and v project the text, which the video shares, so a reference-branch adapter cannot
act on them (``global`` mode can). The video rows keep the base weights; the video sees the adapter only
through the reference's keys and values in its self-attention.

Which rows: the reference frames CustomVideoXApply inserts in front of the video (the per-call state of
:mod:`.frames_patch`), in every batch row; in one-way mode, every row of the reference's own pass
(:mod:`.wan_reference_stream`, which runs each block through its block replace), and none of the video's.
Without an inserted reference (no CustomVideoXApply, or a
Phantom/VACE graph, whose own reference frames are the model's trained input, not a CustomVideoX reference)
every block runs the host's forward as is: the model is exactly the base model.

How, through two patches a clone carries and the host's own patch/unpatch applies and undoes:

* each adapted ``Linear``'s class is swapped (object patch of ``diffusion_model.blocks.N.<path>.__class__``)
  for a subclass of its own class (whatever the host's ops made it: fp32, manual cast, fp8) whose forward
  calls the host's forward and adds ``strength * scale * up @ down @ x`` on the reference rows. Weight
  patches (the core LoRA loaders, global mode) and low-VRAM casting still run in the host's forward;
* a ``("dit", "double_block", N)`` block replace (the host's patch point, chained onto one already there)
  tells the Linears of block N which rows and pairs apply during that block's call — a context variable,
  since a Linear's forward gets no options — and, in training with gradient checkpointing, recomputes the
  block in backward.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from ..cvx_core.lora import WAN_REFERENCE_MODULES, LoraPair, ReferenceLora
from . import options
from .errors import PatchError
from .wan import CallOrder, block_call


@dataclass(frozen=True)
class BlockAdapters:
    """What the adapted Linears of the running block apply: the reference rows and, per sub-module
    (``self_attn.q``), the ``(pair, strength)`` of every stacked adapter."""

    rows: tuple[int, int | None]  # end None: every row
    pairs: dict[str, list[tuple[LoraPair, float]]]


_active: contextvars.ContextVar[BlockAdapters | None] = contextvars.ContextVar("cvx_wan_block_adapters",
                                                                               default=None)


def reference_rows(opts: dict) -> tuple[int, int | None] | None:
    """The ``[start, end)`` token rows of the inserted references in this model call (end None: every row, in
    a one-way reference's own pass), or None where the call holds none (a one-way video pass among them)."""
    if not opts.get(options.INSERTED_FRAMES_KEY):
        return None
    if options.in_reference_stream(opts):
        return 0, None
    state = opts.get(options.FRAMES_STATE_KEY)
    if state is None or state.layout.ref_total == 0 or not state.layout.refs_in_queries:
        return None
    start = state.layout.ref_key_span(0)[0]
    return start, start + state.layout.ref_total


class _ReferenceLoraLinear:
    """Mixed in before the host's Linear class of one adapted module (see :func:`lora_linear_class`)."""

    cvx_module = ""  # the block sub-module (``self_attn.q``)
    cvx_base: type  # the host's class it was mixed into

    def forward(self, x, *args, **kwargs):
        y = super().forward(x, *args, **kwargs)
        active = _active.get()
        pairs = active.pairs.get(self.cvx_module) if active is not None else None
        if not pairs:
            return y
        a, b = active.rows
        b = x.shape[1] if b is None else b
        if x.ndim != 3 or x.shape[1] < b:
            raise PatchError(f"CustomVideoXAdapterLoader: Wan {self.cvx_module} got input {tuple(x.shape)}, not the "
                             f"block's token sequence with {b} reference rows; another patch may change Wan's blocks")
        delta = sum(p.delta(x[:, a:b], s).to(y.dtype) for p, s in pairs)
        return torch.cat([y[:, :a], y[:, a:b] + delta, y[:, b:]], dim=1)


@functools.cache
def lora_linear_class(base: type, module: str) -> type:
    """The swapped class of a ``base`` Linear at block sub-module ``module`` (one per pair: patches compare equal)."""
    return type(f"ReferenceLora{base.__name__}", (_ReferenceLoraLinear, base),
                {"cvx_module": module, "cvx_base": base, "__module__": __name__})


class ReferenceLoraBlock:
    """The ``("dit", "double_block", index)`` replace of one adapted Wan block; ``prev``: a replace it chains."""

    def __init__(self, index: int, prev=None):
        self.index, self.prev = index, prev

    def __call__(self, args: dict, extra: dict) -> dict:
        opts = args["transformer_options"]
        active = self.block_adapters(opts)
        if active is None:
            return self._next(args, extra)
        if not (options.checkpointing(opts) and torch.is_grad_enabled()):
            return self._run(args, extra, active)
        state = opts[options.FRAMES_STATE_KEY]  # there are reference rows: the frames patch set its state
        # The host's own original_block would run the last block in the recompute: bind this one.
        original_block = block_call(state.backbone.dm.blocks[self.index])

        def run(img: torch.Tensor) -> torch.Tensor:
            # The recompute also needs this block's index and a fresh self/cross count in the options.
            state.order = CallOrder()
            call = dict(args, img=img, transformer_options=dict(opts, block_index=self.index))
            return self._run(call, {**extra, "original_block": original_block}, active)["img"]

        return {"img": torch.utils.checkpoint.checkpoint(run, args["img"], use_reentrant=False)}

    def block_adapters(self, opts: dict) -> BlockAdapters | None:
        rows = reference_rows(opts)
        if rows is None:
            return None
        pairs: dict[str, list[tuple[LoraPair, float]]] = {}
        for use in options.adapters(opts):
            for sub in WAN_REFERENCE_MODULES:
                p = use.lora.get(f"blocks.{self.index}.{sub}")
                if p is not None and use.strength != 0:
                    pairs.setdefault(sub, []).append((p, use.strength))
        return BlockAdapters(rows, pairs) if pairs else None

    def _next(self, args: dict, extra: dict) -> dict:
        return self.prev(args, extra) if self.prev is not None else extra["original_block"](args)

    def _run(self, args: dict, extra: dict, active: BlockAdapters) -> dict:
        token = _active.set(active)
        try:
            return self._next(args, extra)
        finally:
            _active.reset(token)


def install(m, lora: ReferenceLora) -> None:
    """Patch the clone ``m`` so that ``lora``'s modules (native ``blocks.N.<sub>``) act on reference rows; the
    adapter itself is read from the model options at each call (loaders stack)."""
    for module in sorted(lora.pairs):
        _, index, sub = module.split(".", 2)
        if sub not in WAN_REFERENCE_MODULES:
            raise PatchError(f"CustomVideoXAdapterLoader: {module} is not a Wan reference-branch module "
                             f"({', '.join(WAN_REFERENCE_MODULES)})")
        cls = type(m.get_model_object(f"diffusion_model.{module}"))
        base = getattr(cls, "cvx_base", cls)  # the model may be patched by another clone right now
        m.add_object_patch(f"diffusion_model.{module}.__class__", lora_linear_class(base, sub))
        replaces = options.model_options(m).get("patches_replace", {}).get("dit", {})
        prev = replaces.get(("double_block", int(index)))
        if not isinstance(prev, ReferenceLoraBlock):
            m.set_model_patch_replace(ReferenceLoraBlock(int(index), prev), "dit", "double_block", int(index))

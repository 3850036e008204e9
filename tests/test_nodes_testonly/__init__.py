"""Test-only ComfyUI nodes: fault injectors and probes, loaded into the host only by the test fixtures
(tests/harness/host.py), never shipped as part of the pack. The stand-ins for T5 and photos that the tiny
demo uses too are in devnodes/.

Reliability nodes (tests/test_reliability_*.py):

- CVXTestForeignModel: a tiny random non-CogVideoX-T2V MODEL built by the host's own loader
  (Wan 2.1 DiT, or a CogVideoX image-to-video DiT with 32 input channels).
- CVXTestForeignVAE: a tiny random TAESD-type VAE (the host's comfy.taesd), 4 or 16 latent channels.
- CVXTestBadImage: an IMAGE with NaN or inf pixels, or an empty batch.
- CVXTestTokenizerClip: the host's real CLIP class with the real CogVideoX T5 tokenizer and no text
  encoder weights (tokenizing works, encoding does not): enough for CustomVideoXEntityRegion auto mode.
- CVXTestAnyString: a string on an untyped ("*") output, as some third-party nodes give, which the
  host does not check against a combo's list: the pack's own path checks must hold.
- CVXTestAttentionRecorder: a clone of a MODEL with an ``optimized_attention_override`` that records
  each call (shapes only, plus weak references to the per-run objects it sees) and chains any override
  already there; it can also raise, interrupt (the host's interrupt flag) or pause until interrupted.

Wan: CVXTestWanTokenizerClip (below).
"""

from __future__ import annotations

import os
import re
import time
import weakref

import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

RECORDS: dict[str, list[dict]] = {}  # tag -> one entry per attention call (no strong tensor refs)
RUN_WEAKREFS: dict[str, list[weakref.ref]] = {}  # tag -> weak refs to per-run objects seen in calls


class CVXTestFault(RuntimeError):
    """The fault CVXTestAttentionRecorder injects."""


def _weak_objects(obj, depth: int = 3, seen: set | None = None) -> list:
    """``obj`` and the tensors / containers reachable from it (dataclass fields, dicts, lists), for weak refs."""
    seen = set() if seen is None else seen
    # Modules are the MODEL's (the run's state may point at the shared DiT through its backbone), not the run's.
    if obj is None or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, torch.nn.Module)):
        return []
    seen.add(id(obj))
    out = [obj] if isinstance(obj, torch.Tensor) or hasattr(obj, "__weakref__") else []
    if depth <= 0 or isinstance(obj, torch.Tensor):
        return out
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        children = []
    for c in children:
        out += _weak_objects(c, depth - 1, seen)
    return out


def track_run_objects(tag: str, opts: dict, *extra) -> None:
    """Weak references (under ``tag``) to the per-run objects in the pack's keys of ``opts``, and to ``extra``."""
    refs = RUN_WEAKREFS.setdefault(tag, [])
    for key in opts:
        # The entries belong to the MODEL, not to the run.
        if isinstance(key, str) and key.startswith("customvideox") and key != "customvideox_entries":
            refs += [weakref.ref(o) for o in _weak_objects(opts[key])]
    refs += [weakref.ref(o) for x in extra for o in _weak_objects(x)]


class RecordingOverride:
    def __init__(self, tag: str, prev, fail_at: int, interrupt_at: int, pause_at: int, marker: str | None):
        self.tag, self.prev = tag, prev
        self.fail_at, self.interrupt_at, self.pause_at, self.marker = fail_at, interrupt_at, pause_at, marker

    def __call__(self, func, *args, **kwargs):
        import comfy.model_management as mm

        calls = RECORDS.setdefault(self.tag, [])
        n = len(calls)
        q, k = args[0], args[1]
        mask = kwargs.get("mask")
        opts = kwargs.get("transformer_options") or {}
        pack_keys = sorted(key for key in opts if isinstance(key, str) and key.startswith("customvideox"))
        sigmas = opts.get("sigmas")
        calls.append({"call": n, "q": tuple(q.shape), "k": tuple(k.shape),
                      "mask": None if mask is None else tuple(mask.shape), "pack_keys": pack_keys,
                      "sigma": None if sigmas is None else float(sigmas.max())})
        track_run_objects(self.tag, opts)
        if n == self.fail_at:
            raise CVXTestFault(f"CVXTestAttentionRecorder: injected fault at attention call {n}")
        if n == self.interrupt_at:
            mm.interrupt_current_processing(True)
        if n == self.pause_at:
            if self.marker:
                with open(self.marker, "w", encoding="utf-8") as f:
                    f.write(str(n))
            deadline = time.monotonic() + 60.0
            while not mm.processing_interrupted() and time.monotonic() < deadline:
                time.sleep(0.02)
        if self.prev is not None:
            return self.prev(func, *args, **kwargs)
        return func(*args, **kwargs)


class CVXTestAttentionRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CVXTestAttentionRecorder",
            display_name="CVX Test Attention Recorder (test only)",
            category="customvideox/testing",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("tag", default="rec"),
                io.Int.Input("fail_at_call", default=-1, min=-1, max=10**6),
                io.Int.Input("interrupt_at_call", default=-1, min=-1, max=10**6),
                io.Int.Input("pause_at_call", default=-1, min=-1, max=10**6),
                io.String.Input("marker_name", default=""),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, tag: str, fail_at_call: int, interrupt_at_call: int, pause_at_call: int,
                marker_name: str) -> io.NodeOutput:
        m = model.clone()
        to = m.model_options.setdefault("transformer_options", {})
        marker = None
        if marker_name:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", marker_name) or marker_name.startswith("."):
                raise ValueError(f"marker_name must be a plain file name, got {marker_name!r}")
            marker = os.path.join(folder_paths.get_output_directory(), marker_name)
        to["optimized_attention_override"] = RecordingOverride(
            tag, to.get("optimized_attention_override"), fail_at_call, interrupt_at_call, pause_at_call, marker)
        return io.NodeOutput(m)


def _cogvideox_i2v_state_dict(seed: int) -> dict:
    from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=64, in_channels=32,
                                            out_channels=16, time_embed_dim=64, text_embed_dim=32, num_layers=1,
                                            patch_size=2, use_rotary_positional_embeddings=True,
                                            dtype=torch.float32, operations=torch.nn)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _wan_state_dict(seed: int) -> dict:
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=128, ffn_dim=256, freq_dim=256,
                     text_dim=4096, out_dim=16, num_heads=1, num_layers=1, operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.02 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


class CVXTestForeignModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CVXTestForeignModel",
            display_name="CVX Test Foreign Model (test only)",
            category="customvideox/testing",
            inputs=[io.Combo.Input("arch", options=["wan21", "cogvideox_i2v"], default="wan21"),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1)],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, arch: str, seed: int) -> io.NodeOutput:
        import comfy.sd

        sd = _wan_state_dict(seed) if arch == "wan21" else _cogvideox_i2v_state_dict(seed)
        model = comfy.sd.load_diffusion_model_state_dict(sd)
        if model is None:
            raise RuntimeError(f"the host did not detect the tiny {arch} model")
        return io.NodeOutput(model)


class CVXTestForeignVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CVXTestForeignVAE",
            display_name="CVX Test Foreign VAE (test only)",
            category="customvideox/testing",
            inputs=[io.Int.Input("latent_channels", default=4, min=1, max=64),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1)],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, latent_channels: int, seed: int) -> io.NodeOutput:
        import comfy.sd
        import comfy.taesd.taesd

        shapes = comfy.taesd.taesd.TAESD(latent_channels=latent_channels).state_dict()
        gen = torch.Generator().manual_seed(seed)
        sd = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in shapes.items()}
        return io.NodeOutput(comfy.sd.VAE(sd=sd))


class CVXTestBadImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CVXTestBadImage",
            display_name="CVX Test Bad Image (test only)",
            category="customvideox/testing",
            inputs=[io.Combo.Input("kind", options=["nan", "inf", "empty"], default="nan"),
                    io.Int.Input("width", default=64, min=8, max=4096),
                    io.Int.Input("height", default=64, min=8, max=4096)],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, kind: str, width: int, height: int) -> io.NodeOutput:
        if kind == "empty":
            return io.NodeOutput(torch.zeros(0, height, width, 3))
        img = torch.full((1, height, width, 3), 0.5)
        img[0, height // 2, width // 2, 1] = float("nan") if kind == "nan" else float("inf")
        return io.NodeOutput(img)


def _tokenizer_only_clip_class():
    import comfy.sd

    class TokenizerOnlyCLIP(comfy.sd.CLIP):
        # No model patcher: the host's RAM-pressure release asks every cached output is_dynamic(), which on a
        # real CLIP reads its patcher (a crash there kills the server's prompt worker thread).
        def is_dynamic(self) -> bool:
            return False

    return TokenizerOnlyCLIP


_TokenizerOnlyCLIP = _tokenizer_only_clip_class()


class CVXTestTokenizerClip(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CVXTestTokenizerClip",
            display_name="CVX Test Tokenizer-only CLIP (test only)",
            category="customvideox/testing",
            inputs=[],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        import comfy.sd
        import comfy.text_encoders.cogvideo

        clip = comfy.sd.CLIP.__new__(_TokenizerOnlyCLIP)  # no text encoder: tokenizing only
        clip.tokenizer = comfy.text_encoders.cogvideo.CogVideoXTokenizer()
        clip.tokenizer_options = {}
        return io.NodeOutput(clip)


class CVXTestAnyString(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CVXTestAnyString",
            display_name="CVX Test Any String (test only)",
            category="customvideox/testing",
            inputs=[io.String.Input("value", default="")],
            outputs=[io.AnyType.Output()],
        )

    @classmethod
    def execute(cls, value: str) -> io.NodeOutput:
        return io.NodeOutput(value)


# ------------------------------------------------------------------------------------------------
# Fault injectors, one per stage of a run (tests/host/test_reliability_faults.py). Each fires once, at its
# ``at``-th use, either ``raise`` (CVXTestFault) or ``interrupt``: the host's interrupt flag (what POST
# /interrupt sets) and then the host's own check, which raises InterruptProcessingException there, as the
# host's progress hook does inside any long operation.
# - CVXTestFaultyBlock: a MODEL whose block 1 fires inside the pack's one-way reference pass (a class patch
#   of the block, applied by the host's object patches like the pack's adapter blocks; the main pass is
#   untouched).
# - CVXTestFaultyRegion: an ERAE region whose entity positions fire when the auto map is computed from them.
# - CVXTestFaultyVAE: a VAE whose encode fires (the reference encode).
# - CVXTestFaultyPatcher: a MODEL whose clones fire when a block's class is patched (the adapter loader).

import copy  # noqa: E402
import functools  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from comfy.ldm.cogvideo.model import CogVideoXBlock  # noqa: E402

FAULT_KEY = "cvx_test_fault"  # transformer_options key of a FaultSpec
FAULT_KINDS = ["raise", "interrupt"]
FIRED: dict[str, str] = {}  # tag -> where its fault fired
# Set by the pack in the block options of its one-way reference pass (cvx_host/options.py REFERENCE_STREAM_KEY).
REFERENCE_STREAM_KEY = "customvideox_reference_stream"


@dataclass
class FaultSpec:
    kind: str
    where: str
    tag: str
    at: int
    uses: int = 0

    def use(self) -> None:
        import comfy.model_management as mm

        self.uses += 1
        if self.uses != self.at:
            return
        FIRED[self.tag] = self.where
        if self.kind == "raise":
            raise CVXTestFault(f"injected fault in {self.where} (use {self.at})")
        mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()


def _fault_inputs() -> list:
    return [io.Combo.Input("kind", options=FAULT_KINDS, default="raise"),
            io.Int.Input("at", default=1, min=1, max=10**6, tooltip="fire at this use (1 = the first)"),
            io.String.Input("tag", default="fault")]


class FaultBlock(CogVideoXBlock):
    """The host's block; in the pack's one-way reference pass it first uses the model's FaultSpec."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, transformer_options=None):
        opts = transformer_options or {}
        spec = opts.get(FAULT_KEY)
        if isinstance(spec, FaultSpec) and opts.get(REFERENCE_STREAM_KEY):
            track_run_objects(spec.tag, opts, hidden_states, encoder_hidden_states, temb, image_rotary_emb)
            spec.use()
        return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, transformer_options)


class CVXTestFaultyBlock(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="CVXTestFaultyBlock", display_name="CVX Test Faulty Block (test only)",
                         category="customvideox/testing", inputs=[io.Model.Input("model"), *_fault_inputs()],
                         outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, kind: str, at: int, tag: str) -> io.NodeOutput:
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})[FAULT_KEY] = FaultSpec(
            kind, "the one-way reference pass (block 1)", tag, at)
        m.add_object_patch("diffusion_model.blocks.1.__class__", FaultBlock)
        return io.NodeOutput(m)


class _FaultyPositions(Sequence):
    """Entity token positions; reading them all (iterating) is one use."""

    def __init__(self, positions: Sequence[int], spec: FaultSpec) -> None:
        self.positions, self.spec = tuple(positions), spec

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        return self.positions[i]

    def __iter__(self):
        self.spec.use()
        return iter(self.positions)


class CVXTestFaultyRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="CVXTestFaultyRegion", display_name="CVX Test Faulty Region (test only)",
                         category="customvideox/testing",
                         inputs=[io.Custom("CVX_REGION").Input("region"), *_fault_inputs()],
                         outputs=[io.Custom("CVX_REGION").Output()])

    @classmethod
    def execute(cls, region, kind: str, at: int, tag: str) -> io.NodeOutput:
        if region.mode != "auto":
            raise ValueError("CVXTestFaultyRegion needs an auto-mode region (its map is computed while sampling)")
        r = copy.copy(region)
        spec = FaultSpec(kind, "the ERAE auto map computation", tag, at)
        object.__setattr__(r, "entity_idx", _FaultyPositions(region.entity_idx, spec))
        return io.NodeOutput(r)


class CVXTestFaultyVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="CVXTestFaultyVAE", display_name="CVX Test Faulty VAE (test only)",
                         category="customvideox/testing", inputs=[io.Vae.Input("vae"), *_fault_inputs()],
                         outputs=[io.Vae.Output()])

    @classmethod
    def execute(cls, vae, kind: str, at: int, tag: str) -> io.NodeOutput:
        v = copy.copy(vae)
        spec = FaultSpec(kind, "the reference VAE encode", tag, at)
        encode = vae.encode

        def faulty_encode(*args, **kwargs):
            spec.use()
            return encode(*args, **kwargs)

        v.encode = faulty_encode
        return io.NodeOutput(v)


@functools.cache
def _faulty_patcher_class(base: type) -> type:
    def add_object_patch(self, name, obj):
        spec = self.model_options.get("transformer_options", {}).get(FAULT_KEY)
        if isinstance(spec, FaultSpec) and name.startswith("diffusion_model.blocks.") and name.endswith(".__class__"):
            spec.use()
        return base.add_object_patch(self, name, obj)

    return type(f"CVXTestFaulty{base.__name__}", (base,), {"add_object_patch": add_object_patch})


class CVXTestFaultyPatcher(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="CVXTestFaultyPatcher", display_name="CVX Test Faulty Patcher (test only)",
                         category="customvideox/testing", inputs=[io.Model.Input("model"), *_fault_inputs()],
                         outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, kind: str, at: int, tag: str) -> io.NodeOutput:
        m = model.clone()
        m.__class__ = _faulty_patcher_class(type(model))  # clones keep their class: the loader's clone fires
        m.model_options.setdefault("transformer_options", {})[FAULT_KEY] = FaultSpec(
            kind, "the adapter loader (patching a block)", tag, at)
        return io.NodeOutput(m)


RELIABILITY_NODES: list[type[io.ComfyNode]] = [
    CVXTestAttentionRecorder, CVXTestForeignModel, CVXTestForeignVAE, CVXTestBadImage, CVXTestTokenizerClip,
    CVXTestAnyString, CVXTestFaultyBlock, CVXTestFaultyRegion, CVXTestFaultyVAE, CVXTestFaultyPatcher,
]


class CVXTestNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(RELIABILITY_NODES)


async def comfy_entrypoint() -> CVXTestNodes:
    return CVXTestNodes()


# ------------------------------------------------------------------------------------------------
# Wan test node (tests/host/test_wan_tokens.py, tests/host/test_wan_e2e.py). Appended; joins the list above.
#
# - CVXTestWanTokenizerClip: the host's real CLIP class with the host's real Wan umT5 tokenizer
#   (comfy.text_encoders.wan.WanT5Tokenizer) and no text encoder. The umT5 SentencePiece model ships
#   inside the text encoder file, not in the host tree, so the tokenizer holds the SentencePiece
#   model the host tree does ship (comfy/text_encoders/t5_pile_tokenizer): same code path, other vocab.

def wan_tokenizer_clip():
    import comfy.sd
    import comfy.text_encoders.wan

    spiece = os.path.join(os.path.dirname(comfy.sd.__file__), "text_encoders", "t5_pile_tokenizer", "tokenizer.model")
    with open(spiece, "rb") as f:
        data = f.read()
    clip = comfy.sd.CLIP.__new__(comfy.sd.CLIP)  # no text encoder: tokenizing only
    clip.tokenizer = comfy.text_encoders.wan.WanT5Tokenizer(tokenizer_data={"spiece_model": data})
    clip.tokenizer_options = {}
    return clip


class CVXTestWanTokenizerClip(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CVXTestWanTokenizerClip",
            display_name="CVX Test Wan Tokenizer-only CLIP (test only)",
            category="customvideox/testing",
            inputs=[],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(wan_tokenizer_clip())


RELIABILITY_NODES.append(CVXTestWanTokenizerClip)

"""Bad input through the real host gives a clear error naming the node and the input; awkward input
that a user can make gives the right result.

Every case is a whole prompt run by the host's own ``execution.validate_prompt`` and ``PromptExecutor``
(in-process); a few also go through the real server, which must then go on serving the next prompt.
An error case passes when the host reports the error at the expected node and the message names the node,
the input and what is expected (key words asserted; errors that surface at the sampler must *start* with
the pack's node id and input). The tally written to test-artifacts/reliability.json (section
``bad_inputs``) comes from pytest's own reports, per input kind: the pack's own checks apart from the
host's validator (schema ranges, combo lists, broken JSON), cases not run listed as such.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import reliability_graphs as rg
import tiny_models as tm
import torch
from harness import graphs
from safetensors.torch import save_file

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]

MESSAGES: dict[str, str] = {}  # case id -> what the user was shown (information only, not the tally)


@pytest.fixture(scope="module", autouse=True)
def tally(request) -> Iterator[None]:
    with rg.collect_outcomes(request.config) as seen:
        yield
    items = [i for i in request.session.items if i.module is request.module]
    report = rg.tally_report(CASES, items, seen.by_nodeid, MESSAGES)
    rg.record("bad_inputs", report, replace=True)
    line = "; ".join(f"{label}: {report[o]['handled']} of {report[o]['kinds']} input kinds handled "
                     f"({report[o]['tried']} tried)"
                     for o, label in (("pack", "pack's own"), ("host", "host validator")) if o in report)
    rg.report_line(request.config, f"\nreliability: {line} (test-artifacts/reliability.json)")




@pytest.fixture(scope="module")
def ctx(host, tiny_models, tmp_path_factory) -> Iterator[rg.Ctx]:
    """Bad model and adapter files in extra diffusion_models / loras folders of the in-process host."""
    import folder_paths

    root = tmp_path_factory.mktemp("cvx_bad_files")
    dm, lo = root / "diffusion_models", root / "loras"
    dm.mkdir()
    lo.mkdir()
    good = tiny_models.paths["native_1_0"].read_bytes()
    (dm / "cvx_bad_truncated.safetensors").write_bytes(good[: len(good) // 2])
    (dm / "cvx_bad_corrupt.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{not json" + os.urandom(64))
    (dm / "cvx_bad_text.safetensors").write_text("this is not a model\n", encoding="utf-8")
    torch.save(tm.build_native_state_dict(), dm / "cvx_bad_pickle.ckpt")
    sd = tm.build_native_state_dict()
    save_file({k: v for k, v in sd.items() if not k.startswith("blocks.1.ff_")}, str(dm / "cvx_bad_incomplete.safetensors"))
    lora = {"diffusion_model.blocks.0.q.lora_down.weight": torch.zeros(4, 128),
            "diffusion_model.blocks.0.q.lora_up.weight": torch.zeros(128, 4)}
    save_file(lora, str(lo / "cvx_good_lora.safetensors"))
    raw = (lo / "cvx_good_lora.safetensors").read_bytes()
    (lo / "cvx_bad_truncated_lora.safetensors").write_bytes(raw[: len(raw) - 100])
    (lo / "cvx_bad_text_lora.safetensors").write_text("not a lora", encoding="utf-8")
    torch.save(lora, lo / "cvx_bad_pickle_lora.pt")
    folder_paths.add_model_folder_path("diffusion_models", str(dm))
    folder_paths.add_model_folder_path("loras", str(lo))
    try:
        yield rg.Ctx(tiny_models)
    finally:
        for kind, d in (("diffusion_models", dm), ("loras", lo)):
            folder_paths.folder_names_and_paths[kind][0].remove(str(d))
            folder_paths.filename_list_cache.pop(kind, None)


def outcome(host, prompt: dict[str, Any]) -> dict[str, Any]:
    """Run ``prompt`` as the server's worker does; the structured error, not just its text."""
    import execution

    pid = str(uuid.uuid4())
    valid, error, outputs, node_errors = host.loop.run_until_complete(
        execution.validate_prompt(pid, copy.deepcopy(prompt), None))
    if not valid:
        return {"stage": "validation", "error": error, "node_errors": node_errors}
    ex = host.executor
    host.loop.run_until_complete(ex.execute_async(copy.deepcopy(prompt), pid, {}, outputs))
    if ex.success:
        return {"stage": "success"}
    errs = [d for ev, d in ex.status_messages if ev == "execution_error"]
    return {"stage": "execution", "error": errs[0] if errs else ex.status_messages}


# ------------------------------------------------------------------------------------------ graphs


def with_model(c: rg.Ctx, node: dict[str, Any], **kw) -> dict[str, Any]:
    """The patched graph with the Apply's MODEL from ``node``."""
    p = rg.patched(c, **kw)
    p["other_model"] = node
    p[rg.APPLY]["inputs"]["model"] = ["other_model", 0]
    return p


def with_image(c: rg.Ctx, node: dict[str, Any], **kw) -> dict[str, Any]:
    p = rg.patched(c, **kw)
    p[rg.IMG] = node
    return p


def with_enc(c: rg.Ctx, **inputs) -> dict[str, Any]:
    p = rg.patched(c)
    p[rg.ENC]["inputs"].update(inputs)
    return p


def with_mask(c: rg.Ctx, w: int, h: int, value: float) -> dict[str, Any]:
    p = rg.patched(c)
    p["mask"] = {"class_type": "SolidMask", "inputs": {"value": value, "width": w, "height": h}}
    p[rg.ENC]["inputs"]["mask"] = ["mask", 0]
    return p


def with_region(c: rg.Ctx, size: dict[str, int] | None = None, **inputs) -> dict[str, Any]:
    p = rg.patched(c, **(size or {}))
    region = {"mode": "auto", "lam": 1.0, "map_block": 0, "refine": "soft", "top_k": 0.25, "smooth": 0,
              "prompt": "a corgi runs on the beach", "subject_words": "corgi"}
    region.update(inputs)
    p["region"] = {"class_type": "CustomVideoXEntityRegion", "inputs": region}
    p["clip"] = {"class_type": "CVXTestTokenizerClip", "inputs": {}}
    if region["mode"] == "auto" and "clip" not in inputs:
        p["region"]["inputs"]["clip"] = ["clip", 0]
    p[rg.APPLY]["inputs"]["region"] = ["region", 0]
    return p


def frames_mask(frames: int, w: int = 32, h: int = 32) -> dict[str, Any]:
    """Nodes whose "region_mask" is a MASK of ``frames`` different frames (a CVXTestImage batch's red)."""
    return {"mask_frames": {"class_type": "CVXTestImage",
                            "inputs": {"seed": 3, "width": w, "height": h, "batch_size": frames}},
            "region_mask": {"class_type": "ImageToMask", "inputs": {"image": ["mask_frames", 0], "channel": "red"}}}


def solid_mask(value: float, w: int = 32, h: int = 32) -> dict[str, Any]:
    return {"region_mask": {"class_type": "SolidMask", "inputs": {"value": value, "width": w, "height": h}}}


def with_region_mask(c: rg.Ctx, mask_nodes: dict[str, Any], length: int = 5, cogvideox_1_5: bool = False,
                     **inputs) -> dict[str, Any]:
    """ERAE in mask mode with ``mask_nodes`` (providing "region_mask"); a ``length``-frame video."""
    p = with_region(c, size={"length": length}, mode="mask", **inputs)
    p.update(mask_nodes)
    p["region"]["inputs"]["mask"] = ["region_mask", 0]
    if cogvideox_1_5:
        p[graphs.MODEL]["inputs"]["unet_name"] = c.tiny.unet_1_5
    return p


def stacked(c: rg.Ctx, **second: Any) -> dict[str, Any]:
    """Two CustomVideoXApply in a row (same reference), the second with ``second``'s inputs."""
    p = rg.patched(c)
    node = copy.deepcopy(p[rg.APPLY])
    node["inputs"].update(second)
    return rg.insert_model_node(p, "apply2", node, after=rg.APPLY)




def with_tab(c: rg.Ctx, **inputs) -> dict[str, Any]:
    p = rg.patched(c)
    p.update({k: v for k, v in rg.tab_only(**inputs).items() if k == "tab"})
    p[rg.APPLY]["inputs"]["schedule"] = ["tab", 0]
    return p


def loader(model_name: str | list, **kw) -> dict[str, Any]:
    return {"class_type": "CustomVideoXModelLoader", "inputs": {"model_name": model_name, "weight_dtype": "default",
                                                                 "rope": "exact", **kw}}


def model_file(c: rg.Ctx, name: str | list, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """CustomVideoXModelLoader -> the plain sampler (no reference)."""
    p = rg.base_prompt(c.tiny)
    p[graphs.MODEL] = loader(name)
    p.update(extra or {})
    return p


def adapter_file(c: rg.Ctx, name: str | list, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    p = rg.patched(c)
    p["adapter"] = {"class_type": "CustomVideoXAdapterLoader",
                    "inputs": {"model": [rg.APPLY, 0], "lora_name": name, "strength": 1.0, "mode": "reference_only"}}
    for nid, node in p.items():
        for k, v in node["inputs"].items():
            if v == [rg.APPLY, 0] and nid != "adapter":
                node["inputs"][k] = ["adapter", 0]
    p.update(extra or {})
    return p


def any_string(value: str) -> dict[str, Any]:
    return {"path": {"class_type": "CVXTestAnyString", "inputs": {"value": value}}}


# ------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[rg.Ctx], dict[str, Any]]
    stage: str  # "validation" or "execution" (an error), or "success" (the prompt must run)
    node: str  # the prompt node id the host must report
    words: tuple[str, ...]  # all must appear (case-insensitive) in the error the user sees
    input: str | None = None  # for validation errors: the input the host names
    starts: str | None = None  # the error must start with this ("<pack node id> <input>")
    same_kind_as: str | None = None  # another case id of the same input kind (e.g. on another model)

    @property
    def owner(self) -> str:
        """"host": the host's own validator answers (schema ranges, lists, broken JSON); else the pack."""
        return "host" if self.stage == "validation" else "pack"

    @property
    def kind(self) -> str:
        return self.same_kind_as or self.id


APPLY_WORDS = ("CustomVideoXApply",)
ENC_WORDS = ("CustomVideoXReferenceEncode",)
SAMPLER = graphs.SAMPLED

CASES = [
    # -- wrong model / VAE
    Case("wan_model_into_apply", lambda c: with_model(c, {"class_type": "CVXTestForeignModel",
                                                          "inputs": {"arch": "wan21", "seed": 0}}),
         # Apply takes Wan T2V now; a CogVideoX-encoded reference (also 16 channels) into it is the error.
         "execution", rg.APPLY, (*APPLY_WORDS, "reference", "CogVideoX VAE", "MODEL is Wan", "Wan model's own VAE")),
    Case("i2v_model_into_apply", lambda c: with_model(c, {"class_type": "CVXTestForeignModel",
                                                          "inputs": {"arch": "cogvideox_i2v", "seed": 0}}),
         "execution", rg.APPLY, (*APPLY_WORDS, "model", "32 input channels", "text-to-video")),
    Case("sd_vae_4ch_reference", lambda c: _foreign_vae(c, 4), "execution", rg.ENC,
         (*ENC_WORDS, "vae", "not a CogVideoX VAE", "load the CogVideoX VAE")),
    Case("flux_like_vae_16ch_reference", lambda c: _foreign_vae(c, 16), "execution", rg.ENC,
         (*ENC_WORDS, "vae", "not a CogVideoX VAE")),
    Case("reference_encoded_at_another_size", lambda c: with_enc(c, width=48), "execution", SAMPLER,
         ("CustomVideoXReferenceEncode", "width/height", "48x32", "32x32"),
         starts="CustomVideoXReferenceEncode width/height:"),
    # -- sizes, frames, images
    Case("reference_width_not_multiple_of_16", lambda c: with_enc(c, width=40), "execution", rg.ENC,
         (*ENC_WORDS, "width", "height", "40x32", "multiples of 16")),
    Case("video_width_not_multiple_of_16", lambda c: rg.patched(c, width=40, enc_inputs={"width": 32}), "execution",
         SAMPLER, ("CustomVideoX", "width", "height", "multiples of 16", "40x32", "empty latent"),
         starts="CustomVideoXReferenceEncode width/height:"),
    Case("empty_image_batch", lambda c: with_image(c, {"class_type": "CVXTestBadImage",
                                                       "inputs": {"kind": "empty", "width": 32, "height": 32}}),
         "execution", rg.ENC, (*ENC_WORDS, "image", "empty")),
    Case("nan_in_reference", lambda c: with_image(c, {"class_type": "CVXTestBadImage",
                                                      "inputs": {"kind": "nan", "width": 32, "height": 32}}),
         "execution", rg.ENC, (*ENC_WORDS, "image", "NaN")),
    Case("inf_in_reference", lambda c: with_image(c, {"class_type": "CVXTestBadImage",
                                                      "inputs": {"kind": "inf", "width": 32, "height": 32}}),
         "execution", rg.ENC, (*ENC_WORDS, "image", "inf")),
    Case("mask_wrong_size", lambda c: with_mask(c, 64, 16, 1.0), "execution", rg.ENC,
         (*ENC_WORDS, "mask", "64x16", "40x24", "aspect")),
    Case("mask_all_zeros", lambda c: with_mask(c, 40, 24, 0.0), "execution", rg.ENC,
         (*ENC_WORDS, "mask", "empty", "all zeros")),
    Case("region_mask_all_zeros", lambda c: _region_mask(c, 0.0), "execution", "region",
         ("CustomVideoXEntityRegion", "mask", "all zeros")),
    # -- ranges (the V3 schema's min/max, checked by the host before anything runs)
    Case("strength_above_max", lambda c: rg.patched(c, strength=20.0), "validation", rg.APPLY,
         ("bigger than max", "10.0", "strength"), "strength"),
    Case("strength_below_min", lambda c: rg.patched(c, strength=-1.0), "validation", rg.APPLY,
         ("smaller than min", "strength"), "strength"),
    Case("tab_bias_above_max", lambda c: with_tab(c, curve="parabolic", b_max=50.0), "validation", "tab",
         ("bigger than max", "b_max"), "b_max"),
    Case("region_lambda_below_min", lambda c: with_region(c, mode="mask", lam=-1.0), "validation", "region",
         ("smaller than min", "lam"), "lam"),
    Case("attention_mode_unknown", lambda c: rg.patched(c, apply_inputs={"attention_mode": "three_way"}),
         "validation", rg.APPLY, ("three_way", "attention_mode", "not in list"), "attention_mode"),
    Case("block_range_outside_model", lambda c: rg.patched(c, apply_inputs={"block_start": 5}), "execution",
         rg.APPLY, (*APPLY_WORDS, "block_start", "block_end", "0..1")),
    Case("region_map_block_after_last_block", lambda c: with_region(c, map_block=1), "execution", rg.APPLY,
         (*APPLY_WORDS, "map_block", "below")),
    # -- keyframes
    Case("keyframes_not_a_number", lambda c: rg.tab_only(keyframes="0:0, half:1"), "execution", "tab",
         ("CustomVideoXTABSchedule", "keyframes", '"half"', "not a number")),
    Case("keyframes_no_colon", lambda c: rg.tab_only(keyframes="0 1, 1:0"), "execution", "tab",
         ("CustomVideoXTABSchedule", "keyframes", "progress:bias")),
    Case("keyframes_progress_outside_0_1", lambda c: rg.tab_only(keyframes="0:0, 1.5:1"), "execution", "tab",
         ("CustomVideoXTABSchedule", "keyframes", "outside 0..1")),
    Case("keyframes_bias_not_finite", lambda c: rg.tab_only(keyframes="0:0, 1:nan"), "execution", "tab",
         ("CustomVideoXTABSchedule", "keyframes", "not a finite number")),
    Case("keyframes_empty", lambda c: rg.tab_only(keyframes=" , "), "execution", "tab",
         ("CustomVideoXTABSchedule", "keyframes", "no point")),
    # -- ERAE subject words
    Case("subject_word_not_in_prompt", lambda c: with_region(c, subject_words="cat"), "execution", "region",
         ("CustomVideoXEntityRegion", "subject_words", '"cat"', "not in the prompt")),
    Case("subject_words_empty", lambda c: with_region(c, subject_words=" "), "execution", "region",
         ("CustomVideoXEntityRegion", "subject word", "clip", "prompt")),
    Case("auto_region_without_clip", lambda c: with_region(c, clip=None), "execution", "region",
         ("CustomVideoXEntityRegion", "clip", "auto")),
    Case("subject_word_cjk", lambda c: with_region(c, prompt="一只柯基在海滩上奔跑", subject_words="柯基"),
         "execution", "region", ('"柯基"', "cannot be spelled", "mask"),
         starts="CustomVideoXEntityRegion subject_words:"),
    Case("subject_word_emoji", lambda c: with_region(c, prompt="a 🐶 runs on the beach", subject_words="🐶"),
         "execution", "region", ('"🐶"', "cannot be spelled", "mask"), starts="CustomVideoXEntityRegion subject_words:"),
    Case("subject_words_multi_word_repeated_accented",
         lambda c: with_region(c, prompt="a corgi dog near a café; the corgi dog sleeps", subject_words="corgi dog, café"),
         "success", SAMPLER, ()),
    Case("subject_word_beyond_the_conditioning",  # the sampler's text has 16 tokens (a short prompt)
         lambda c: with_region(c, prompt="on a sunny day at the old harbour of a small fishing town, a corgi runs",
                               subject_words="corgi"),
         "execution", SAMPLER, ("16 text tokens", "same prompt"), starts="CustomVideoXEntityRegion subject_words:"),
    # -- ERAE masks
    Case("region_mask_per_video_frame", lambda c: with_region_mask(c, frames_mask(9), length=9), "success",
         SAMPLER, ()),
    Case("region_mask_per_video_frame_cogvideox_1_5",
         lambda c: with_region_mask(c, frames_mask(9), length=9, cogvideox_1_5=True), "success", SAMPLER, (),
         same_kind_as="region_mask_per_video_frame"),
    Case("region_mask_wrong_frame_count", lambda c: with_region_mask(c, frames_mask(4), length=9), "execution",
         SAMPLER, ("4 frames", "expected 1", "9 (one per video frame"), starts="CustomVideoXEntityRegion mask:"),
    Case("region_mask_wrong_frame_count_cogvideox_1_5",
         lambda c: with_region_mask(c, frames_mask(5), length=9, cogvideox_1_5=True), "execution", SAMPLER,
         ("5 frames", "2 (one per latent token frame)", "9 (one per video frame"),
         starts="CustomVideoXEntityRegion mask:", same_kind_as="region_mask_wrong_frame_count"),
    Case("region_mask_other_aspect_ratio", lambda c: with_region_mask(c, solid_mask(1.0, w=64)), "execution",
         SAMPLER, ("64x32", "32x32", "aspect", "stretched"), starts="CustomVideoXEntityRegion mask:"),
    # -- stacked Apply nodes
    Case("stacked_apply_reference_rope_differs", lambda c: stacked(c, reference_rope="shift"), "execution",
         "apply2", ("'shift'", "'negative'", "every CustomVideoXApply"), starts="CustomVideoXApply reference_rope:"),
    Case("stacked_apply_attention_mode_differs", lambda c: stacked(c, attention_mode="one_way"), "execution",
         "apply2", ("'one_way'", "'two_way'"), starts="CustomVideoXApply attention_mode:"),
    Case("wrong_model_into_adapter_loader", lambda c: _adapter_on(c, {"class_type": "CVXTestForeignModel",
                                                                      "inputs": {"arch": "wan21", "seed": 0}}),
         "execution", "adapter", ("CustomVideoXAdapterLoader", "lora_name", "is for CogVideoX, not Wan")),
    # -- model / adapter files
    Case("model_file_truncated", lambda c: model_file(c, "cvx_bad_truncated.safetensors"), "execution",
         graphs.MODEL, ("CustomVideoXModelLoader", "model_name", "cvx_bad_truncated.safetensors")),
    Case("model_file_corrupt_header", lambda c: model_file(c, "cvx_bad_corrupt.safetensors"), "execution",
         graphs.MODEL, ("CustomVideoXModelLoader", "model_name", "cvx_bad_corrupt.safetensors")),
    Case("model_file_not_safetensors", lambda c: model_file(c, "cvx_bad_text.safetensors"), "execution",
         graphs.MODEL, ("CustomVideoXModelLoader", "model_name", "cvx_bad_text.safetensors")),
    Case("model_file_pickle", lambda c: model_file(c, "cvx_bad_pickle.ckpt"), "execution", graphs.MODEL,
         ("CustomVideoXModelLoader", "model_name", "safetensors")),
    Case("model_file_incomplete", lambda c: model_file(c, "cvx_bad_incomplete.safetensors"), "execution",
         graphs.MODEL, ("CustomVideoXModelLoader", "model_name", "incomplete", "missing")),
    Case("adapter_file_truncated", lambda c: adapter_file(c, "cvx_bad_truncated_lora.safetensors"), "execution",
         "adapter", ("CustomVideoXAdapterLoader", "lora_name", "cvx_bad_truncated_lora.safetensors")),
    Case("adapter_file_not_safetensors", lambda c: adapter_file(c, "cvx_bad_text_lora.safetensors"),
         "execution", "adapter", ("CustomVideoXAdapterLoader", "lora_name", "cvx_bad_text_lora.safetensors")),
    Case("adapter_file_pickle", lambda c: adapter_file(c, "cvx_bad_pickle_lora.pt"), "execution", "adapter",
         ("CustomVideoXAdapterLoader", "lora_name", "safetensors")),
    # -- paths outside the models folders
    Case("model_path_traversal_typed", lambda c: model_file(c, "../vae/" + c.tiny.vae), "validation",
         graphs.MODEL, ("not in list", "model_name"), "model_name"),
    Case("model_path_traversal_linked", lambda c: model_file(c, ["path", 0], any_string("../vae/" + c.tiny.vae)),
         "execution", graphs.MODEL, ("CustomVideoXModelLoader", "model_name", "not allowed", "..")),
    Case("model_path_absolute_linked", lambda c: model_file(c, ["path", 0], any_string("/etc/passwd")),
         "execution", graphs.MODEL, ("CustomVideoXModelLoader", "model_name", "not allowed", "absolute")),
    Case("adapter_path_traversal_linked",
         lambda c: adapter_file(c, ["path", 0], any_string("../diffusion_models/" + c.tiny.unet)),
         "execution", "adapter", ("CustomVideoXAdapterLoader", "lora_name", "not allowed", "..")),
    # -- broken workflow JSON
    Case("workflow_missing_input", lambda c: rg.drop_input(rg.patched(c), rg.APPLY, "strength"), "validation",
         rg.APPLY, ("required input is missing", "strength"), "strength"),
    Case("workflow_link_to_missing_node", lambda c: _relink(rg.patched(c), rg.APPLY, "reference", "999"),
         "validation", rg.APPLY, ("999",)),  # the host's message names the missing node, not the input
    Case("workflow_unknown_node_type", lambda c: rg.retype(rg.patched(c), rg.APPLY, "CustomVideoXApplyV9"),
         "validation", rg.APPLY, ("CustomVideoXApplyV9", "not found", "#apply")),
]


def _adapter_on(c: rg.Ctx, model_node: dict[str, Any]) -> dict[str, Any]:
    p = adapter_file(c, "cvx_good_lora.safetensors")
    p["other_model"] = model_node
    p["adapter"]["inputs"]["model"] = ["other_model", 0]
    return p


def _foreign_vae(c: rg.Ctx, channels: int) -> dict[str, Any]:
    p = rg.patched(c)
    p[rg.VAE_ID] = {"class_type": "CVXTestForeignVAE", "inputs": {"latent_channels": channels, "seed": 0}}
    return p


def _region_mask(c: rg.Ctx, value: float) -> dict[str, Any]:
    p = with_region(c, mode="mask")
    p["region_mask"] = {"class_type": "SolidMask", "inputs": {"value": value, "width": 32, "height": 32}}
    p["region"]["inputs"]["mask"] = ["region_mask", 0]
    return p




def _relink(p: dict[str, Any], nid: str, name: str, target: str) -> dict[str, Any]:
    p[nid]["inputs"][name] = [target, 0]
    return p




def user_text(result: dict[str, Any], node: str) -> tuple[str, str | None]:
    """What the user is shown for ``node`` (message + details), and the input the host names."""
    if result["stage"] == "execution":
        e = result["error"]
        assert isinstance(e, dict), e
        assert e.get("node_id") == node, f"error reported at node {e.get('node_id')} ({e.get('node_type')}), " \
                                         f"expected {node}: {e.get('exception_message')}"
        return str(e.get("exception_message")), None
    errs = (result["node_errors"].get(node) or {}).get("errors") or []
    if not errs:  # prompt-level errors (unknown node type) name the node in the message/details
        err = result["error"]
        return f"{err.get('message')} {err.get('details')}", None
    texts = [f"{x.get('message')} {x.get('details')} {x.get('extra_info', {}).get('input_name')}" for x in errs]
    names = [x.get("extra_info", {}).get("input_name") for x in errs]
    return " | ".join(texts), next((n for n in names if n), None)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_input_case(host, ctx, case: Case) -> None:
    result = outcome(host, case.build(ctx))
    if case.stage == "success":
        assert result["stage"] == "success", f"expected the prompt to run, got {result}"
        return
    assert result["stage"] == case.stage, f"expected a {case.stage} error, got {result}"
    text, input_name = user_text(result, case.node)
    MESSAGES[case.id] = text
    if case.starts is not None:
        assert text.startswith(case.starts), f"the error does not start with {case.starts!r}: {text}"
    missing = [w for w in case.words if w.lower() not in text.lower()]
    assert not missing, f"the error does not say {missing}: {text}"
    if case.input is not None:
        assert input_name == case.input, (input_name, text)


def test_the_table_names_a_node_and_input_for_every_sampler_error() -> None:
    """An error raised while sampling is shown at the sampler node: its text must say which of the pack's
    nodes and inputs to change."""
    loose = [c.id for c in CASES if c.stage == "execution" and c.node == SAMPLER and not c.starts]
    assert not loose, loose
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.same_kind_as in {x.id for x in CASES} for c in CASES if c.same_kind_as)


def test_per_video_frame_region_mask_is_used_frame_by_frame_on_cogvideox_1_5(host, tiny_models) -> None:
    """9 video frames of a CogVideoX 1.5 video are 3 latent frames, padded to 4 and patched into 2 token
    frames (video frames 0..4 and 5..8): a 9-frame mask white on frames 0..4, black on 5..8, must give
    exactly the run of the 2-frame mask [white, black], and not the run of an all-white mask."""
    c = rg.Ctx(tiny_models)

    def solid_frames(*runs: tuple[int, int]) -> dict[str, Any]:  # (frames, colour) runs, batched
        nodes: dict[str, Any] = {}
        prev = None
        for i, (n, colour) in enumerate(runs):
            nodes[f"f{i}"] = {"class_type": "EmptyImage",
                              "inputs": {"width": 32, "height": 32, "batch_size": n, "color": colour}}
            if prev is not None:
                nodes[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": [prev, 0], "image2": [f"f{i}", 0]}}
            prev = f"b{i}" if prev is not None else f"f{i}"
        nodes["region_mask"] = {"class_type": "ImageToMask", "inputs": {"image": [prev, 0], "channel": "red"}}
        return nodes

    def run(mask_nodes: dict[str, Any], name: str) -> torch.Tensor:
        p = with_region_mask(c, mask_nodes, length=9, cogvideox_1_5=True, lam=4.0)
        p["save_latent"]["inputs"]["name"] = name
        return host.run(p, capture=[SAMPLER]).output(SAMPLER)["samples"]

    per_video = run(solid_frames((5, 0xFFFFFF), (4, 0)), "rel_mask_per_video")
    per_token = run(solid_frames((1, 0xFFFFFF), (1, 0)), "rel_mask_per_token")
    all_white = run(solid_frames((1, 0xFFFFFF)), "rel_mask_white")
    assert per_video.shape == (1, 16, 3, 4, 4) and torch.isfinite(per_video).all()
    assert torch.equal(per_video, per_token)
    assert (per_video - all_white).abs().max() > 1e-4


def test_host_keeps_serving_after_every_bad_input(host, tiny_models) -> None:
    """After all the failures above, the same in-process host still runs a patched prompt."""
    out = host.run(rg.patched_prompt(tiny_models, save_name="rel_after_bad"), capture=[SAMPLER])
    latent = out.output(SAMPLER)["samples"]
    assert latent.shape == (1, 16, 2, 4, 4) and torch.isfinite(latent).all()


def test_frame_count_not_4n_plus_1_is_rounded_by_the_host(host, tiny_models) -> None:
    """Not an error the pack can raise: the pack never sees a pixel frame count. The host's
    EmptyHunyuanLatentVideo turns any length into (length-1)//4+1 latent frames (10 -> 3, decoding to 9);
    CogVideoX 1.5 (temporal patch 2) pads odd latent frame counts itself. Both run with the reference."""
    out = host.run(rg.patched_prompt(tiny_models, length=10, save_name="rel_len10"), capture=[SAMPLER])
    assert out.output(SAMPLER)["samples"].shape[2] == 3
    p = rg.patched_prompt(tiny_models, length=9, save_name="rel_15_odd")
    p[graphs.MODEL]["inputs"]["unet_name"] = tiny_models.unet_1_5
    latent = host.run(p, capture=[SAMPLER]).output(SAMPLER)["samples"]
    assert latent.shape[2] == 3 and torch.isfinite(latent).all()


# ------------------------------------------------------------------------------------------ server


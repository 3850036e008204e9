"""Isolation. The user's MODEL is never changed in place; two patched clones of one model in
one graph give what each gives alone; the pack's attention override chains with another one (a test-only
recorder) in both orders; a patched model goes through the host's own LoraLoaderModelOnly.

All through the real in-process host (validate_prompt + PromptExecutor) on the tiny CogVideoX.
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import reliability_graphs as rg
import torch
from harness import graphs
from safetensors.torch import save_file

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]
SAMPLER = graphs.SAMPLED



def recorder_module(host):
    return sys.modules[host.node_classes["CVXTestAttentionRecorder"].__module__]


def pack(host, name: str):
    pkg = host.node_classes["CustomVideoXApply"].__module__.rsplit(".nodes", 1)[0]
    return importlib.import_module(f"{pkg}.{name}")


def recorder(tag: str, **kw: int) -> dict[str, Any]:
    inputs = {"tag": tag, "fail_at_call": -1, "interrupt_at_call": -1, "pause_at_call": -1, "marker_name": ""}
    inputs.update(kw)
    return {"class_type": "CVXTestAttentionRecorder", "inputs": inputs}


def latent(host, prompt: dict[str, Any]) -> torch.Tensor:
    return host.run(prompt, capture=[SAMPLER]).output(SAMPLER)["samples"].clone()


def assert_host_rotary(dm) -> None:
    """The shared DiT builds RoPE with the host's own method again (the host restores an object patch by
    setting the backed-up bound method back, so compare the underlying function)."""
    fn = getattr(dm._get_rotary_emb, "__func__", None)
    assert fn is type(dm)._get_rotary_emb, f"an object patch is still applied: {dm._get_rotary_emb!r}"


def fingerprint(value: Any, depth: int = 0) -> Any:
    """Identity/contents of a model_options-like structure: containers by content, tensors by value,
    everything else by identity."""
    if depth > 8:
        return ("deep", id(value))
    if isinstance(value, dict):
        return ("dict", id(value), tuple((repr(k), fingerprint(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, id(value), tuple(fingerprint(v, depth + 1) for v in value))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.detach().cpu().clone())
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return ("obj", id(value))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def snapshot(patcher) -> dict[str, Any]:
    return {
        "weights": {k: v.detach().clone() for k, v in patcher.model.state_dict().items()},
        "object_patches": fingerprint(patcher.object_patches),
        "model_options": fingerprint(patcher.model_options),
        "patches": fingerprint(patcher.patches),
        "wrappers": fingerprint(patcher.wrappers),
        "callbacks": fingerprint(patcher.callbacks),
        "attachments": fingerprint(getattr(patcher, "attachments", {})),
    }


def assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["weights"].keys() == after["weights"].keys()
    changed = [k for k in before["weights"] if not torch.equal(before["weights"][k], after["weights"][k])]
    assert not changed, f"weights changed in place: {changed[:5]}"
    for key in before:
        if key != "weights":
            assert same(before[key], after[key]), f"the user's MODEL {key} changed"


def test_users_model_is_never_changed_in_place(host, tiny_models) -> None:
    import comfy.model_management as mm

    base_prompt = rg.base_prompt(tiny_models, save_name="iso_base")
    first = host.run(base_prompt, capture=[graphs.MODEL, SAMPLER])
    model = first.output(graphs.MODEL)
    base_out = first.output(SAMPLER)["samples"].clone()
    before = snapshot(model)
    dm = model.model.diffusion_model
    for strength, mode in ((2.0, "two_way"), (0.5, "one_way")):
        p = rg.patched_prompt(tiny_models, strength=strength, save_name="iso_patched",
                              apply_inputs={"attention_mode": mode})
        run = host.run(p, capture=[graphs.MODEL, rg.APPLY, SAMPLER])
        assert run.output(graphs.MODEL) is model, "the loader's MODEL was not reused (cache miss?)"
        patched = run.output(rg.APPLY)
        assert patched is not model and patched.model is model.model  # a clone sharing the weights
        assert not torch.equal(run.output(SAMPLER)["samples"], base_out)  # the reference acts
        assert_same_snapshot(before, snapshot(model))
    # Loading the user's model again restores the host's own RoPE builder on the shared module, and the
    # plain graph gives exactly what it gave before any patched run.
    assert latent(host, rg.base_prompt(tiny_models, seed=3)).shape == base_out.shape  # runs the plain model
    mm.load_models_gpu([model])
    assert_host_rotary(dm)
    host.reset()
    assert torch.equal(latent(host, base_prompt), base_out)


def _two_branches(tiny_models) -> dict[str, Any]:
    a = rg.patched_prompt(tiny_models, ref_seed=7, strength=2.0, save_name="iso_a")
    b = rg.patched_prompt(tiny_models, ref_seed=8, strength=0.5, save_name="iso_b",
                          apply_inputs={"attention_mode": "one_way"})
    shared = {graphs.MODEL, graphs.LATENT, graphs.POS, graphs.NEG, rg.VAE_ID, "noise", "sampler"}
    merged = copy.deepcopy(a)
    for nid, node in b.items():
        if nid in shared:
            continue
        node = copy.deepcopy(node)
        for name, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and v[0] not in shared:
                node["inputs"][name] = [v[0] + "_b", v[1]]
        merged[nid + "_b"] = node
    return merged


def test_two_patched_clones_in_one_graph_equal_each_alone(host, tiny_models) -> None:
    both = _two_branches(tiny_models)
    run = host.run(both, capture=[SAMPLER, SAMPLER + "_b"])
    a_both, b_both = (run.output(n)["samples"].clone() for n in (SAMPLER, SAMPLER + "_b"))
    host.reset()  # each alone, computed again from scratch
    a_alone = latent(host, rg.patched_prompt(tiny_models, ref_seed=7, strength=2.0, save_name="iso_a"))
    host.reset()
    b_alone = latent(host, rg.patched_prompt(tiny_models, ref_seed=8, strength=0.5, save_name="iso_b",
                                             apply_inputs={"attention_mode": "one_way"}))
    assert torch.equal(a_both, a_alone), (a_both - a_alone).abs().max()
    assert torch.equal(b_both, b_alone), (b_both - b_alone).abs().max()
    assert not torch.allclose(a_alone, b_alone)


def test_override_chains_with_a_recording_override_in_both_orders(host, tiny_models) -> None:
    tn = recorder_module(host)
    p = rg.patched_prompt(tiny_models, strength=2.0, save_name="iso_rec")
    alone = latent(host, p)
    base = latent(host, rg.base_prompt(tiny_models, save_name="iso_rec_base"))
    runs = {}
    for order, after in (("recorder_then_pack", graphs.MODEL), ("pack_then_recorder", rg.APPLY),
                         ("recorder_without_pack", None)):
        tag = f"iso-{order}-{uuid.uuid4().hex[:8]}"
        if after is None:
            prompt = rg.insert_model_node(rg.base_prompt(tiny_models, save_name="iso_rec_base"), "rec",
                                          recorder(tag), after=graphs.MODEL)
        else:
            prompt = rg.insert_model_node(p, "rec", recorder(tag), after=after)
        runs[order] = (latent(host, prompt), tn.RECORDS[tag])
    blocks, text, video, ref = 2, rg.TEXT_LEN, 2 * 2 * 2, 2 * 2
    for order, (out, calls) in runs.items():
        want = base if order == "recorder_without_pack" else alone
        assert torch.equal(out, want), f"{order}: the recorder changed the result"
        assert len(calls) == blocks * rg.STEPS, (order, len(calls))
    # Under the pack (it chains the recorder): the joint sequence with the reference keys and the pack's
    # key-column bias; over the pack: the host's own call, which the pack then handles.
    under = runs["recorder_then_pack"][1]
    assert all(c["k"][2] == text + ref + video and c["mask"] == (2, 1, 1, text + ref + video) for c in under), under
    over = runs["pack_then_recorder"][1]
    assert all(c["k"][1] == text + ref + video and c["mask"] is None for c in over), over
    assert all("customvideox_state" in c["pack_keys"] for c in under + over)
    plain = runs["recorder_without_pack"][1]
    assert all(c["k"][1] == text + video and not c["pack_keys"] for c in plain), plain


@pytest.fixture(scope="module")
def host_lora(host, tiny_models, tmp_path_factory) -> Iterator[str]:
    """A tiny LoRA in ComfyUI's own key layout (diffusion_model.<module>.lora_up/down) for the tiny model,
    in an extra loras folder of the in-process host."""
    import folder_paths

    folder = tmp_path_factory.mktemp("cvx_rel_loras")
    g = torch.Generator().manual_seed(5)
    sd = {}
    for b in range(2):
        for t in ("q", "k", "v", "attn_out", "ff_proj"):
            out = 512 if t == "ff_proj" else 128
            sd[f"diffusion_model.blocks.{b}.{t}.lora_down.weight"] = 0.3 * torch.randn(4, 128, generator=g)
            sd[f"diffusion_model.blocks.{b}.{t}.lora_up.weight"] = 0.3 * torch.randn(out, 4, generator=g)
            sd[f"diffusion_model.blocks.{b}.{t}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(folder / "cvx_rel_host_lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(folder))
    yield "cvx_rel_host_lora.safetensors"
    folder_paths.folder_names_and_paths["loras"][0].remove(str(folder))
    folder_paths.filename_list_cache.pop("loras", None)


def test_patched_model_through_the_hosts_lora_loader(host, tiny_models, host_lora, caplog) -> None:
    lora = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": host_lora, "strength_model": 0.8}}
    p = rg.patched_prompt(tiny_models, strength=2.0, save_name="iso_lora")
    with caplog.at_level(logging.WARNING):
        apply_then_lora = latent(host, rg.insert_model_node(p, "lora", lora, after=rg.APPLY))
        lora_then_apply = latent(host, rg.insert_model_node(p, "lora", lora, after=graphs.MODEL))
        lora_only = latent(host, rg.insert_model_node(rg.base_prompt(tiny_models, save_name="iso_lora"), "lora",
                                                      lora, after=graphs.MODEL))
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()], caplog.text[-2000:]
    pack_only = latent(host, p)
    assert torch.isfinite(apply_then_lora).all()
    assert torch.allclose(apply_then_lora, lora_then_apply, atol=1e-6), (apply_then_lora - lora_then_apply).abs().max()
    assert (apply_then_lora - pack_only).abs().max() > 1e-3, "the host's LoRA did not act on the patched model"
    assert (apply_then_lora - lora_only).abs().max() > 1e-3, "the reference did not act after the host's LoRA"

"""CustomVideoX adapters (cvx_core.lora / lora_keys, cvx_host/adapters.py, CustomVideoXAdapterLoader)
on the real host's tiny CogVideoX.

One set of LoRA pairs is written in the four key layouts (PEFT + adapter_config.json, PEFT + metadata,
kohya + .alpha, ComfyUI-native); all must load to the same weights and outputs. The reference-branch
mode must leave the model exactly the base model whenever the reference is off, and global mode must be
exactly the host's own weight patch. The host's LoRA loader is the peer for global mode and for stacking.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from customvideox.nodes import adapter_loader
from harness import graphs, patching
from harness.host import HostRunError
from safetensors.torch import load_file, save_file

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]

TEXT_LEN = 8
RANK, ALPHA, FF_OUT_ALPHA = 4, 8.0, 4.0
DIFFUSERS_SUB = {"q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v", "attn_out": "attn1.to_out.0",
                 "ff_proj": "ff.net.0.proj", "ff_out": "ff.net.2"}
LAYOUTS = ("peft_config", "peft_metadata", "kohya", "native")





def random_pairs(seed: int = 0, targets=tuple(DIFFUSERS_SUB), blocks=(0, 1), scale: float = 0.3):
    """``{(block, target): (down [r, in], up [out, r])}`` for the tiny model (width 128, ff 512)."""
    g = torch.Generator().manual_seed(seed)
    dims = {"q": (128, 128), "k": (128, 128), "v": (128, 128), "attn_out": (128, 128), "ff_proj": (512, 128),
            "ff_out": (128, 512)}
    return {(b, t): (torch.randn(RANK, dims[t][1], generator=g) * scale, torch.randn(dims[t][0], RANK, generator=g)
                     * scale) for b in blocks for t in targets}


def alpha_of(target: str) -> float:
    return FF_OUT_ALPHA if target == "ff_out" else ALPHA


def write_layout(layout: str, pairs, loras: Path, name: str) -> str:
    """Write ``pairs`` in ``layout`` under ``loras``; returns the name relative to ``loras``."""
    sd, metadata = {}, None
    peft_cfg = {"r": RANK, "lora_alpha": ALPHA, "alpha_pattern": {"ff.net.2": FF_OUT_ALPHA},
                "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]}
    for (b, t), (down, up) in pairs.items():
        if layout.startswith("peft"):
            base = f"transformer.transformer_blocks.{b}.{DIFFUSERS_SUB[t]}"
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = down, up
            continue
        if layout == "kohya":  # diffusers module names on block 0, native ones on block 1: both occur
            sub = DIFFUSERS_SUB[t] if b == 0 else t
            base = f"lora_unet_{'transformer_' if b == 0 else ''}blocks_{b}_{sub}".replace(".", "_")
        else:
            base = f"diffusion_model.blocks.{b}.{t}"
        sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
        sd[f"{base}.alpha"] = torch.tensor(alpha_of(t))
    rel = f"{name}.safetensors"
    if layout == "peft_config":
        rel = f"{name}/adapter_model.safetensors"
        (loras / name).mkdir(parents=True, exist_ok=True)
        (loras / name / "adapter_config.json").write_text(json.dumps(peft_cfg), encoding="utf-8")
    elif layout == "peft_metadata":
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v
                                                                         for k, v in peft_cfg.items()})}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(loras / rel), metadata=metadata)
    return rel


@pytest.fixture(scope="module")
def loras(host, tiny_models) -> Path:
    d = tiny_models.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def adapter_files(loras) -> dict[str, str]:
    pairs = random_pairs(0)
    return {layout: write_layout(layout, pairs, loras, f"cvx_adapter_{layout}") for layout in LAYOUTS}


@pytest.fixture(scope="module")
def other_lora(loras) -> str:
    """An ordinary LoRA for the host's own loader (native names)."""
    return write_layout("native", random_pairs(5, targets=("ff_out", "q"), scale=0.5), loras, "other_native_lora")


@pytest.fixture
def base(tiny_models):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(tiny_models.native_state_dict("native_1_0"))


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(2, 16, 3, 4, 6, generator=g), torch.tensor([600.0, 600.0]),
            torch.randn(2, TEXT_LEN, 32, generator=g), torch.randn(1, 16, 1, 4, 6, generator=g))


def forward(m, inputs, cond_or_uncond=None):
    x, t, ctx, _ = inputs
    return patching.forward(m, x, t, ctx, **({} if cond_or_uncond is None else {"cond_or_uncond": cond_or_uncond}))


def with_reference(host, m, inputs, strength=1.0, mode="two_way", apply_to_uncond=True):
    return patching.apply_reference(m, inputs[3], strength=strength, attention_mode=mode,
                                    apply_to_uncond=apply_to_uncond)


def load(host, m, loras: Path, rel: str, mode="reference_only", strength=1.0):
    from customvideox.nodes import adapter_loader as al
    return al.load_adapter(m, str(loras / rel), strength, mode)


def host_lora(host, m, name: str, strength=1.0):
    return host.node_classes["LoraLoaderModelOnly"]().load_lora_model_only(m, name, strength)[0]


def test_every_layout_loads_to_the_same_weights_and_outputs(host, tiny_models, base, loras, adapter_files, inputs):
    import comfy.model_management as mm

    expected_layouts = {"peft_config": ["diffusers/PEFT"], "peft_metadata": ["diffusers/PEFT"], "kohya": ["kohya"],
                        "native": ["ComfyUI-native"]}
    weights, outs = {}, {}
    for layout, rel in adapter_files.items():
        adapted, report = load(host, base, loras, rel)
        assert report.layouts == expected_layouts[layout] and not report.unused, report.text()
        assert report.modules == 12 and len(report.used) == (24 if layout.startswith("peft") else 36)
        outs[layout] = forward(with_reference(host, adapted, inputs), inputs)
        patched, _ = load(host, base, loras, rel, mode="global")
        mm.load_models_gpu([patched])
        weights[layout] = {k: v.clone() for k, v in patched.model.diffusion_model.state_dict().items()}
    for layout in LAYOUTS[1:]:
        assert torch.equal(outs[layout], outs["native"]), layout
        assert all(torch.equal(weights[layout][k], weights["native"][k]) for k in weights["native"]), layout
    # alpha / rank folded, alpha_pattern honoured: W + (alpha / r) * up @ down.
    down, up = random_pairs(0)[(1, "ff_out")]
    w0 = tiny_models.native_state_dict()["blocks.1.ff_out.weight"]  # the shared model holds the patched one now
    assert torch.allclose(weights["peft_config"]["blocks.1.ff_out.weight"], w0 + FF_OUT_ALPHA / RANK * up @ down,
                          atol=1e-5)


def test_reference_off_is_exactly_the_base_model(host, base, loras, adapter_files, inputs):
    plain = forward(base, inputs)
    adapted, _ = load(host, base, loras, adapter_files["native"])
    assert torch.equal(forward(adapted, inputs), plain)  # no CustomVideoXApply at all
    for mode in ("two_way", "one_way"):
        assert torch.equal(forward(with_reference(host, adapted, inputs, strength=0.0, mode=mode), inputs), plain)
    # Reference on for the cond row only: the uncond row (reference masked) is the model without adapter.
    on = forward(with_reference(host, adapted, inputs, apply_to_uncond=False), inputs, cond_or_uncond=[0, 1])
    ref_only = forward(with_reference(host, base, inputs, apply_to_uncond=False), inputs, cond_or_uncond=[0, 1])
    assert torch.equal(on[1], ref_only[1])
    assert (on[0] - ref_only[0]).abs().max() > 1e-4
    # Patch and unpatch: the shared model's blocks are the host's class again and compute the base model.
    assert torch.equal(forward(base, inputs), plain)
    assert all(type(b).__name__ == "CogVideoXBlock" for b in base.model.diffusion_model.blocks)


@pytest.mark.parametrize("mode", ["two_way", "one_way"])
def test_reference_on_changes_the_output_and_a_zero_adapter_does_not(host, base, loras, adapter_files, inputs,
                                                                      mode):
    from customvideox.cvx_core import lora as lora
    from customvideox.cvx_host import adapters as rb
    without = forward(with_reference(host, base, inputs, mode=mode), inputs)
    adapted, _ = load(host, base, loras, adapter_files["kohya"])
    assert (forward(with_reference(host, adapted, inputs, mode=mode), inputs) - without).abs().max() > 1e-4
    # A fresh adapter (up = 0): our block forward must reproduce the host's block maths.
    zero = lora.init_adapter(lora.block_target_shapes(rb.module_shapes(base), lora.TARGETS), RANK, ALPHA)
    zeroed = rb.apply_reference_adapter(base, zero, 1.0)
    assert torch.allclose(forward(with_reference(host, zeroed, inputs, mode=mode), inputs), without, atol=1e-6)


def test_global_mode_is_the_hosts_weight_patch(host, base, loras, adapter_files, inputs):
    ours, report = load(host, base, loras, adapter_files["peft_metadata"], mode="global", strength=0.7)
    assert report.modules == 12
    theirs = host_lora(host, base, adapter_files["native"], strength=0.7)
    assert torch.equal(forward(ours, inputs), forward(theirs, inputs))
    assert (forward(ours, inputs) - forward(base, inputs)).abs().max() > 1e-3


def test_stacks_with_the_hosts_lora_loader_and_apply_in_either_order(host, base, loras, adapter_files, other_lora,
                                                                     inputs):
    def adapter(m):
        return load(host, m, loras, adapter_files["native"])[0]

    orders = {
        "lora, adapter, apply": with_reference(host, adapter(host_lora(host, base, other_lora)), inputs),
        "apply, adapter, lora": host_lora(host, adapter(with_reference(host, base, inputs)), other_lora),
        "adapter, apply, lora": host_lora(host, with_reference(host, adapter(base), inputs), other_lora),
    }
    outs = {k: forward(m, inputs) for k, m in orders.items()}
    first = next(iter(outs.values()))
    assert all(torch.equal(o, first) for o in outs.values()), {k: (o - first).abs().max() for k, o in outs.items()}
    no_host_lora = forward(with_reference(host, adapter(base), inputs), inputs)
    no_adapter = forward(with_reference(host, host_lora(host, base, other_lora), inputs), inputs)
    assert (first - no_host_lora).abs().max() > 1e-3 and (first - no_adapter).abs().max() > 1e-4
    # Global mode stacked on the host's LoRA: both weight patches add up, in either order.
    a = forward(load(host, host_lora(host, base, other_lora), loras, adapter_files["kohya"], "global")[0], inputs)
    b = forward(host_lora(host, load(host, base, loras, adapter_files["kohya"], "global")[0], other_lora), inputs)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_bad_files_give_clear_errors_and_leave_the_model_alone(host, base, loras, adapter_files, inputs):
    from customvideox.cvx_core import checkpoint_keys as ck
    from customvideox.cvx_core import lora_keys as lk
    plain = forward(base, inputs)
    patches_before = dict(base.object_patches)
    save_file({"text_model.encoder.layers.0.mlp.fc1.lora_up.weight": torch.zeros(4, 4),
               "text_model.encoder.layers.0.mlp.fc1.lora_down.weight": torch.zeros(4, 4),
               "some_other_tensor": torch.zeros(3)}, str(loras / "unknown_keys.safetensors"))
    with pytest.raises(lk.LoraKeyError) as e:
        load(host, base, loras, "unknown_keys.safetensors")
    msg = str(e.value)
    assert "found keys like some_other_tensor, text_model.encoder.layers.0.mlp.fc1.lora_down.weight, " in msg
    assert all(x in msg for x in lk.EXPECTED_EXAMPLES), msg

    wrong = random_pairs(1, targets=("q",))
    save_file({f"diffusion_model.blocks.{b}.q.lora_down.weight": torch.zeros(RANK, 64) for b, _ in wrong} |
              {f"diffusion_model.blocks.{b}.q.lora_up.weight": torch.zeros(64, RANK) for b, _ in wrong},
              str(loras / "wrong_model.safetensors"))
    with pytest.raises(lk.LoraKeyError, match="the LoRA is for another model"):
        load(host, base, loras, "wrong_model.safetensors")

    data = (loras / adapter_files["native"]).read_bytes()
    (loras / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        load(host, base, loras, "truncated.safetensors")
    with pytest.raises(lk.LoraKeyError, match="pickle"):
        lk.read_lora_file(loras / "evil.pt")
    # reference_only cannot use non-projection modules: reported, not dropped silently.
    extra = {"diffusion_model.proj_out.lora_down.weight": torch.zeros(RANK, 128),
             "diffusion_model.proj_out.lora_up.weight": torch.zeros(64, RANK)}
    save_file(extra | load_file(str(loras / adapter_files["native"])), str(loras / "with_proj_out.safetensors"))
    _, report = load(host, base, loras, "with_proj_out.safetensors")
    assert "diffusion_model.proj_out.lora_up.weight" in report.unused and "not a block projection" in report.text()
    _, report = load(host, base, loras, "with_proj_out.safetensors", mode="global")
    assert not report.unused

    assert base.object_patches == patches_before and torch.equal(forward(base, inputs), plain)


def test_adapter_loader_node_runs_in_the_host(host, tiny_models, adapter_files, loras):
    plain = graphs.t2v_prompt(tiny_models.unet, width=32, height=32, length=5, steps=2, text_length=TEXT_LEN,
                              save_name="adapter_plain")
    adapted = json.loads(json.dumps(plain).replace("adapter_plain", "adapter_node"))
    adapted["adapter"] = {"class_type": "CustomVideoXAdapterLoader",
                          "inputs": {"model": [graphs.MODEL, 0], "lora_name": adapter_files["peft_config"],
                                     "strength": 1.0, "mode": "reference_only"}}
    for node_id in ("guider", "sigmas"):
        adapted[node_id]["inputs"]["model"] = ["adapter", 0]
    a = host.run(plain, capture=[graphs.SAMPLED])
    b = host.run(adapted, capture=[graphs.SAMPLED, "adapter"])
    report = b.output("adapter", 1)
    assert "24 key(s) used on 12 module(s), 0 not used" in report and "PEFT config" in report, report
    # No reference in this graph: the adapted model is the base model, bit for bit.
    assert torch.equal(a.output(graphs.SAMPLED)["samples"], b.output(graphs.SAMPLED)["samples"])
    with pytest.raises(ValueError, match="not allowed"):
        adapter_loader.resolve_lora_path("../escape.safetensors")
    bad = json.loads(json.dumps(adapted))
    bad["adapter"]["inputs"]["lora_name"] = "../../etc/passwd"
    with pytest.raises(HostRunError):
        host.run(bad)

"""Smoke tests: the real host boots with the pack, lists its nodes, and runs the tiny CogVideoX end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from harness import graphs
from harness.host import (
    PACK_LINK,
    PACK_NODE_IDS,
    REPO_ROOT,
    TEST_NODE_IDS,
    HostRunError,
    run_quick_test,
)


def _pack_import_problems(log: str) -> list[str]:
    """Lines that show the pack (or the test nodes) failed to import, incl. traceback frames in them."""
    problems = [ln for ln in log.splitlines() if "IMPORT FAILED" in ln]
    markers = ("comfyui-customvideox", str(REPO_ROOT), "cvx_test_nodes")
    for block in re.split(r"\n(?=Traceback \(most recent call last\))", log):
        if block.startswith("Traceback") and any(m in block for m in markers):
            problems.append(block[:2000])
    problems += [ln for ln in log.splitlines() if "Cannot import" in ln and any(m in ln for m in markers)]
    return problems


@pytest.mark.server
@pytest.mark.slow
def test_host_boots_with_pack(host_env) -> None:
    assert PACK_LINK.is_symlink() and PACK_LINK.resolve() == REPO_ROOT, (
        "setup.sh must link the pack into the host"
    )
    proc = run_quick_test(host_env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    assert _pack_import_problems(log) == [], log[-8000:]
    # The host prints one import-time line per custom node folder; both ours must be there and not failed.
    assert re.search(r"seconds: .*custom_nodes/comfyui-customvideox\s*$", log, re.M), log[-8000:]
    assert re.search(r"seconds: .*cvx_test_nodes\s*$", log, re.M), log[-8000:]


@pytest.mark.server
def test_object_info_lists_every_pack_node(server) -> None:
    info = server.object_info()
    missing = [n for n in PACK_NODE_IDS + TEST_NODE_IDS if n not in info]
    assert missing == [], f"not in /object_info: {missing}"
    for node_id in PACK_NODE_IDS:
        assert info[node_id]["python_module"].startswith("custom_nodes."), info[node_id]
    assert _pack_import_problems(server.log_text()) == []


@pytest.mark.host
def test_in_process_host_registers_pack(host) -> None:
    missing = [n for n in PACK_NODE_IDS + TEST_NODE_IDS if n not in host.node_classes]
    assert missing == [], f"not registered in-process: {missing}"
    assert host.import_failed == []


def _load_prompt(unet_name: str) -> dict:
    """UNETLoader in the smallest graph the host executes it in (a node runs only if an output needs it)."""
    return graphs.t2v_prompt(unet_name, width=16, height=16, length=1, steps=1, text_length=8, save_name="load")


@pytest.mark.host
def test_save_node_rejects_non_tensors(host) -> None:
    prompt = {
        "c": {"class_type": "CVXTestTextConditioning", "inputs": {"seed": 0, "length": 4, "dim": 32}},
        "s": {"class_type": "CVXTestSaveTensor", "inputs": {"value": ["c", 0], "name": "cond"}},
    }
    with pytest.raises(HostRunError, match="needs a tensor"):
        host.run(prompt)


@pytest.mark.host
@pytest.mark.parametrize("kind,patch_t", [("native_1_0", None), ("native_1_5", 2)])
def test_unet_loader_detects_tiny_cogvideox(host, tiny_models, kind: str, patch_t: int | None) -> None:
    name = tiny_models.unet if kind == "native_1_0" else tiny_models.unet_1_5
    patcher = host.run(_load_prompt(name), capture=[graphs.MODEL]).output(graphs.MODEL)
    assert type(patcher.model).__name__ == "CogVideoX"
    assert type(patcher.model.model_config).__name__ == "CogVideoX_T2V"
    dm = patcher.model.diffusion_model
    assert type(dm).__module__ == "comfy.ldm.cogvideo.model"
    assert (dm.num_attention_heads, dm.attention_head_dim, len(dm.blocks)) == (2, 64, 2)
    assert dm.patch_size_t == patch_t
    assert dm.use_rotary_positional_embeddings
    # The loaded weights are the file's, not a fresh init.
    sd = tiny_models.native_state_dict(kind)
    assert torch.equal(dm.blocks[1].q.weight.detach().float().cpu(), sd["blocks.1.q.weight"])


@pytest.mark.host
@pytest.mark.parametrize("route", ["void", "ksampler"])
def test_tiny_sampling_in_process(host, tiny_models, route: str) -> None:
    prompt = graphs.t2v_prompt(tiny_models.unet, route=route, steps=3, save_name=f"smoke_{route}")
    res = host.run(prompt, capture=[graphs.SAMPLED, graphs.LATENT])
    out = res.output(graphs.SAMPLED)["samples"]
    assert tuple(res.output(graphs.LATENT)["samples"].shape) == (1, 16, 3, 4, 4)
    assert tuple(out.shape) == (1, 16, 3, 4, 4)
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0  # not the empty latent passed through
    saved = [f for f in res.files if f.name == f"smoke_{route}_latent.pt"]
    assert len(saved) == 1 and torch.equal(torch.load(saved[0]), out.cpu())


@pytest.mark.host
def test_sampling_is_seeded_and_depends_on_text(host, tiny_models) -> None:
    def sample(seed: int, text_seed_shift: int = 0) -> torch.Tensor:
        p = graphs.t2v_prompt(tiny_models.unet, steps=2, seed=seed, save_name="seeded")
        p[graphs.POS]["inputs"]["seed"] += text_seed_shift
        return host.run(p, capture=[graphs.SAMPLED]).output(graphs.SAMPLED)["samples"].clone()

    a, b = sample(5), sample(5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, sample(6))
    assert not torch.allclose(a, sample(5, text_seed_shift=100))


@pytest.mark.host
@pytest.mark.slow
def test_tiny_vae_decodes(host, tiny_models) -> None:
    prompt = graphs.t2v_prompt(tiny_models.unet, vae_name=tiny_models.vae, steps=2, save_name="vae")
    res = host.run(prompt, capture=[graphs.VAE, graphs.DECODED])
    vae = res.output(graphs.VAE)
    assert type(vae.first_stage_model).__name__ == "AutoencoderKLCogVideoX"
    assert vae.latent_channels == 16
    img = res.output(graphs.DECODED)
    # 3 latent frames -> 9 frames (4x temporal), 4x4 latent -> 32x32 pixels (8x spatial), RGB in [0, 1].
    assert tuple(img.shape) == (9, 32, 32, 3)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert img.std() > 0


@pytest.mark.host
@pytest.mark.parametrize("kind", ["native_1_0", "native_1_5"])
def test_diffusers_oracle_matches_host_model(host, tiny_models, kind: str) -> None:
    """The diffusers twin holds the same weights: with the host's RoPE made equal to diffusers' (integer
    positions, DESIGN.md §2), one forward agrees to float precision."""
    config = tm.TINY_CONFIG_1_0 if kind == "native_1_0" else tm.TINY_CONFIG_1_5
    name = tiny_models.unet if kind == "native_1_0" else tiny_models.unet_1_5
    ours = host.run(_load_prompt(name), capture=[graphs.MODEL]).output(graphs.MODEL).model.diffusion_model
    oracle = tm.build_diffusers_model(tiny_models.native_state_dict(kind), config)
    gen = torch.Generator().manual_seed(3)
    if kind == "native_1_0":
        x = torch.randn(1, 16, 1, 60, 90, generator=gen)  # the native grid: diffusers' positions are integers
    else:
        x = torch.randn(1, 16, 2, 8, 12, generator=gen)  # 1.5 "slice" RoPE: integers at any size
    ctx = torch.randn(1, 226, 32, generator=gen)
    t = torch.tensor([500.0])
    want = tm.diffusers_forward(oracle, x, t, ctx, config)
    host_scale = ours.spatial_interpolation_scale
    try:
        ours.spatial_interpolation_scale = 1.0
        with torch.no_grad():
            got = ours(x, t, ctx)
    finally:
        ours.spatial_interpolation_scale = host_scale
    assert got.shape == want.shape == x.shape
    assert (got - want).abs().max().item() < 1e-4
    if kind == "native_1_0":
        # The host's default 1.875 scale really differs: the comparison can tell positions apart.
        with torch.no_grad():
            assert (ours(x, t, ctx) - want).abs().max().item() > 1e-3


def test_diffusers_files_are_complete(tiny_models) -> None:
    from safetensors.torch import load_file

    native = tiny_models.native_state_dict()
    single = load_file(str(tiny_models.paths["diffusers_single"]))
    assert set(single) == {tm.native_to_diffusers_key(k) for k in native}
    folder: Path = tiny_models.paths["diffusers_sharded"]
    index = tm.read_index(folder)
    shards = sorted({v for v in index["weight_map"].values()})
    assert len(shards) >= 2
    assert all(re.fullmatch(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    merged: dict[str, torch.Tensor] = {}
    for s in shards:
        merged.update(load_file(str(folder / s)))
    assert set(merged) == set(single) == set(index["weight_map"])
    assert all(torch.equal(merged[k], single[k]) for k in single)
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "CogVideoXTransformer3DModel"
    assert config["num_layers"] == 2 and config["attention_head_dim"] == 64


@pytest.mark.server
@pytest.mark.host
def test_server_run_reports_progress_and_matches_in_process(server, host, tiny_models) -> None:
    prompt = graphs.t2v_prompt(tiny_models.unet, route="ksampler", steps=3, seed=11, save_name="server")
    run = server.run(prompt, timeout=300)
    assert run.history["status"]["status_str"] == "success"
    progress = [m for m in run.of_type("progress") if m.get("node") == graphs.SAMPLED]
    assert [m["value"] for m in progress][-1] == 3 and all(m["max"] == 3 for m in progress)
    executed = {m["node"] for m in run.of_type("executed")}
    assert "save_latent" in executed
    (saved,) = [f for f in run.files if f.name == "server_latent.pt"]
    over_http = torch.load(saved)
    in_process = host.run(prompt, capture=[graphs.SAMPLED]).output(graphs.SAMPLED)["samples"]
    assert torch.isfinite(over_http).all()
    assert torch.allclose(over_http, in_process.cpu(), atol=1e-5)

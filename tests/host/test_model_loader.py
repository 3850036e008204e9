"""CustomVideoXModelLoader and cvx_core.checkpoint_keys against the real host (v0.30.0) and diffusers.

Everything runs the host's own loading path (``comfy.sd.load_diffusion_model_state_dict``,
``comfy.model_management.load_models_gpu`` so object patches are live) on tiny random CogVideoX
models from scripts/tiny_models.py; diffusers' CogVideoXTransformer3DModel is the independent peer.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
from harness.host import bootstrap_host_args  # noqa: E402

# Fails (never skips) when the host tree is missing.
bootstrap_host_args()

import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
import tiny_models as tm  # noqa: E402  (scripts/)
from diffusers import CogVideoXTransformer3DModel as DiffusersCogVideoX  # noqa: E402
from diffusers_oracle import diffusers_rope  # noqa: E402

pytestmark = pytest.mark.host

TEXT_LEN = 16


from customvideox.cvx_core import checkpoint_keys as ck  # noqa: E402
from customvideox.cvx_host import cogvideox as rp  # noqa: E402
from customvideox.nodes import model_loader as ml  # noqa: E402

NATIVE = "cvx_tiny_test_model.safetensors"
NATIVE_1_5 = "cvx_tiny_test_model_1_5.safetensors"
DIFFUSERS_SINGLE = "cvx_tiny_test_model_diffusers.safetensors"
SHARDED = "cvx_tiny_test_model_diffusers_sharded"
DIFFUSERS_1_5 = "cvx_tiny_test_model_1_5_diffusers.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A diffusion_models root of its own (bad files must not show up in other tests' model lists)."""
    base = tmp_path_factory.mktemp("cvx_loader_models")
    tm.build_tiny_model_set(base, include={"native_1_0", "native_1_5", "diffusers_single", "diffusers_sharded"})
    root = base / "diffusion_models"
    tm.save_diffusers_single(tm.build_native_state_dict(tm.TINY_CONFIG_1_5), root / DIFFUSERS_1_5)
    folder_paths.add_model_folder_path("diffusion_models", str(root))
    yield root
    folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(root))
    folder_paths.filename_list_cache.pop("diffusion_models", None)


def load(name: str, rope: str = "host", weight_dtype: str = "default"):
    return ml.CustomVideoXModelLoader.execute(name, weight_dtype, rope).result[0]


def inputs(t: int = 2, h: int = 16, w: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tm.LATENT_CHANNELS, t, h, w, generator=g)
    ctx = torch.randn(1, TEXT_LEN, tm.TEXT_DIM, generator=g)
    return x, torch.tensor([500.0]), ctx


@torch.no_grad()
def host_forward(patcher, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """The DiT forward through the host's memory manager (object patches applied), then unloaded."""
    mm.load_models_gpu([patcher])
    try:
        dev = mm.get_torch_device()
        return patcher.model.diffusion_model(x.to(dev), t.to(dev), ctx.to(dev)).cpu()
    finally:
        mm.unload_model_and_clones(patcher)


@torch.no_grad()
def diffusers_forward(model: DiffusersCogVideoX, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    p, p_t = model.config.patch_size, model.config.patch_size_t
    rot = diffusers_rope(model.config, (x.shape[3] // p, x.shape[4] // p), (x.shape[2] + (p_t or 1) - 1) // (p_t or 1))
    out = model(hidden_states=x.permute(0, 2, 1, 3, 4), encoder_hidden_states=ctx, timestep=t,
                image_rotary_emb=rot, return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- the rename ------------------------------------------------------------------------------------------

RENAME_CASES = {
    "1.0": (tm.TINY_CONFIG_1_0, {}),
    "1.5": (tm.TINY_CONFIG_1_5, {}),
    "1.5_ofs": ({**tm.TINY_CONFIG_1_5, "ofs_embed_dim": 64}, {"ofs_embed_dim": 64}),
    # CogVideoX 1.0 I2V keeps a learned positional table; the host models it with rotary off. 3 heads: the
    # host's sin-cos table builder needs a width divisible by 48 (real models are).
    "learned_pos": ({**tm.TINY_CONFIG_1_0, "num_attention_heads": 3, "use_rotary_positional_embeddings": False,
                     "use_learned_positional_embeddings": True}, {"use_learned_positional_embeddings": True}),
}


@pytest.mark.parametrize("case", list(RENAME_CASES))
def test_rename_maps_every_diffusers_key_to_a_host_key_of_the_same_shape(case: str) -> None:
    host_cfg, extra = RENAME_CASES[case]
    host_sd = tm.build_native_state_dict(host_cfg)
    diff_cfg = {**tm.diffusers_config(host_cfg), "use_rotary_positional_embeddings": True, **extra}
    diff_sd = DiffusersCogVideoX(**diff_cfg).state_dict()
    assert ck.detect_layout(diff_sd) == "diffusers" and ck.detect_layout(host_sd) == "native"
    renamed = ck.diffusers_to_native(diff_sd)
    assert len(renamed) == len(diff_sd)  # no two diffusers keys collapse into one
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in host_sd.items()}
    assert ck.diffusers_to_native(host_sd).keys() == host_sd.keys()  # native keys pass through unchanged


def test_detect_layout_and_prefixes() -> None:
    sd = tm.build_native_state_dict()
    diff = tm.native_to_diffusers(sd)
    assert ck.detect_layout({"model.diffusion_model." + k for k in sd}) == "native"
    assert ck.detect_layout({"transformer." + k for k in diff}) == "diffusers"
    assert ck.detect_layout(["input_blocks.0.0.weight", "blocks.0.ffn.0.weight"]) == "unknown"
    full = {**{"transformer." + k: v for k, v in diff.items()}, "vae.encoder.conv_in.weight": torch.zeros(1)}
    assert ck.diffusers_to_native(full).keys() == sd.keys()  # prefix gone, the VAE tensor dropped


# --- loading each layout -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout_files(models: Path) -> dict[str, str]:
    """Every accepted way to name the same 1.0 weights, as model_name values."""
    sd = tm.build_native_state_dict()
    shard = sorted((models / SHARDED).glob("*-0000*-of-*.safetensors"))[0]
    tm.save_safetensors({"transformer." + k: v for k, v in tm.native_to_diffusers(sd).items()},
                        models / "prefixed_diffusers.safetensors")
    full = {"model.diffusion_model." + k: v for k, v in sd.items()}
    full["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    tm.save_safetensors(full, models / "prefixed_native_full_checkpoint.safetensors")
    return {
        "diffusers_single": DIFFUSERS_SINGLE,
        "sharded_folder": SHARDED + os.sep,
        "sharded_folder_no_slash": SHARDED,
        "index_json": f"{SHARDED}/diffusion_pytorch_model.safetensors.index.json",
        "lone_shard": f"{SHARDED}/{shard.name}",  # loads the whole set through its index
        "prefixed_diffusers": "prefixed_diffusers.safetensors",
        "prefixed_native": "prefixed_native_full_checkpoint.safetensors",
    }


def test_each_layout_gives_the_native_files_output_exactly(layout_files: dict[str, str]) -> None:
    x, t, ctx = inputs()
    ref = host_forward(load(NATIVE), x, t, ctx)
    for kind, name in layout_files.items():
        out = host_forward(load(name), x, t, ctx)
        assert max_diff(out, ref) == 0.0, kind
    x, t, ctx = inputs(t=4)
    assert max_diff(host_forward(load(DIFFUSERS_1_5), x, t, ctx), host_forward(load(NATIVE_1_5), x, t, ctx)) == 0.0


def test_host_mode_is_unet_loader_and_exact_mode_patches_rope(models: Path) -> None:
    plain = comfy.sd.load_diffusion_model(str(models / NATIVE))  # what the core UNETLoader does
    host, exact = load(NATIVE, "host"), load(NATIVE, "exact")
    assert type(host.model) is type(plain.model) and host.object_patches == {}
    assert isinstance(exact.object_patches[rp.ROTARY_ATTR], rp.RotaryPatch)
    assert host.model.state_dict().keys() == plain.model.state_dict().keys()
    x, t, ctx = inputs()
    assert max_diff(host_forward(host, x, t, ctx), host_forward(plain, x, t, ctx)) == 0.0
    # The host's reload factory (non-dynamic delegate, multi-GPU clone) gives the same model.
    fn, args = host.cached_patcher_init
    assert max_diff(host_forward(fn(*args, disable_dynamic=True), x, t, ctx), host_forward(host, x, t, ctx)) == 0.0


@pytest.mark.parametrize("weight_dtype,dtype", [("default", torch.float32), ("bf16", torch.bfloat16),
                                                ("fp16", torch.float16), ("fp8_e4m3fn", torch.float8_e4m3fn)])
def test_weight_dtype(models: Path, weight_dtype: str, dtype: torch.dtype) -> None:
    m = load(DIFFUSERS_SINGLE, "exact", weight_dtype)
    assert m.model.diffusion_model.blocks[0].q.weight.dtype == dtype  # default on --cpu: the host picks fp32
    out = host_forward(m, *inputs(h=8, w=8))
    assert torch.isfinite(out).all()


# --- RoPE modes against diffusers' pipeline ----------------------------------------------------------------


# Diffusers-layout files (the sharded one written by diffusers' own save_pretrained) holding exactly the peer's
# weights: a match checks the rename and the RoPE together against diffusers, with no inverse map involved.
@pytest.mark.parametrize("version,name,grid", [
    ("1.0", SHARDED + os.sep, (60, 90)),  # the native 480x720 grid: integer positions
    ("1.0", SHARDED + os.sep, (16, 24)),  # same aspect, smaller: positions stretched over the training grid
    ("1.0", SHARDED + os.sep, (20, 20)),  # other aspect: centred crop region
    ("1.5", DIFFUSERS_1_5, (16, 24)),
    ("1.5", DIFFUSERS_1_5, (20, 20)),
])
def test_exact_rope_equals_diffusers_pipeline(models: Path, version: str, name: str,
                                              grid: tuple[int, int]) -> None:
    cfg = tm.TINY_CONFIG_1_0 if version == "1.0" else tm.TINY_CONFIG_1_5
    peer = tm.build_diffusers_model(tm.build_native_state_dict(cfg), cfg)
    x, t, ctx = inputs(t=2 if version == "1.0" else 4, h=grid[0], w=grid[1])
    expected = diffusers_forward(peer, x, t, ctx)
    exact = host_forward(load(name, "exact"), x, t, ctx)
    assert max_diff(exact, expected) < 1e-5 * max(1.0, expected.abs().max().item())
    host = host_forward(load(name, "host"), x, t, ctx)
    if version == "1.0":  # the host scales 1.0 positions by 1.875: a real difference
        assert max_diff(host, expected) > 1e-3
    else:  # 1.5 uses integer positions in the host too
        assert max_diff(host, expected) < 1e-5 * max(1.0, expected.abs().max().item())


# --- the model list and path handling ------------------------------------------------------------------


def test_model_list_shows_transformer_folders_not_their_shards(models: Path) -> None:
    vae = models / "SomePipeline" / "vae"  # a pipeline's VAE folder is not a transformer
    vae.mkdir(parents=True, exist_ok=True)
    tm.save_safetensors({"encoder.conv_in.weight": torch.zeros(1)}, vae / "diffusion_pytorch_model.safetensors")
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLCogVideoX"}), encoding="utf-8")
    names = ml.list_models()
    assert SHARDED + os.sep in names and NATIVE in names and DIFFUSERS_SINGLE in names
    assert not any(n.startswith(SHARDED + os.sep) and n != SHARDED + os.sep for n in names)
    assert os.path.join("SomePipeline", "vae", "diffusion_pytorch_model.safetensors") in names
    assert os.path.join("SomePipeline", "vae") + os.sep not in names


@pytest.mark.parametrize("name", [
    "../outside.safetensors",
    "..\\outside.safetensors",
    f"{SHARDED}/../../outside.safetensors",
    "ABSOLUTE",
    "/etc/passwd",
    "C:\\Windows\\system.ini",
    "",
    "no_such_model.safetensors",
])
def test_path_traversal_and_unknown_names_are_refused(models: Path, name: str) -> None:
    outside = models.parent / "outside.safetensors"
    shutil.copy(models / NATIVE, outside)  # a real model just outside the root: must stay unreachable
    if name == "ABSOLUTE":
        name = str(outside)
    with pytest.raises(ValueError, match=r"CustomVideoXModelLoader \(model_name=.*(not allowed|not found)"):
        load(name)


# --- bad files -------------------------------------------------------------------------------------------


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_file(models: Path, kind: str) -> str:
    """Write one bad model under the root; return its model_name."""
    native = (models / NATIVE).read_bytes()
    bad = models / "bad"
    bad.mkdir(exist_ok=True)
    if kind == "truncated":
        (bad / "truncated.safetensors").write_bytes(native[: len(native) // 2])
        return "bad/truncated.safetensors"
    if kind == "random_bytes":
        (bad / "random.safetensors").write_bytes(random.Random(0).randbytes(4096))
        return "bad/random.safetensors"
    if kind in ("ckpt", "bin"):
        path = bad / f"model.{kind}"
        path.write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(bad / f"UNPICKLED_{kind}")))
        return f"bad/{path.name}"
    if kind == "missing_shard":
        shutil.copytree(models / SHARDED, bad / "sharded", dirs_exist_ok=True)
        sorted((bad / "sharded").glob("*-00002-of-*.safetensors"))[0].unlink()
        return "bad/sharded/"
    if kind == "sd_like":
        tm.save_safetensors({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
                             "first_stage_model.encoder.conv_in.weight": torch.zeros(4),
                             "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4)},
                            bad / "sd15.safetensors")
        return "bad/sd15.safetensors"
    if kind == "lora":
        tm.save_safetensors({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 128)},
                            bad / "lora.safetensors")
        return "bad/lora.safetensors"
    if kind == "incomplete":
        sd = tm.build_native_state_dict()
        del sd["blocks.0.ff_out.weight"]
        tm.save_safetensors(sd, bad / "incomplete.safetensors")
        return "bad/incomplete.safetensors"
    if kind == "bad_index":
        shutil.copytree(models / SHARDED, bad / "bad_index", dirs_exist_ok=True)
        index = bad / "bad_index" / "diffusion_pytorch_model.safetensors.index.json"
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"]["proj_out.weight"] = "../../" + NATIVE
        index.write_text(json.dumps(data), encoding="utf-8")
        return "bad/bad_index/"
    if kind == "empty_folder":
        (bad / "empty").mkdir(exist_ok=True)
        return "bad/empty"
    raise AssertionError(kind)


BAD_FILES = {
    "truncated": r"truncated.safetensors: not a valid safetensors file .*truncated or corrupt",
    "random_bytes": r"random.safetensors: not a valid safetensors file .*download or convert it again",
    "ckpt": r"model.ckpt is a pickle-based checkpoint .*convert it to safetensors",
    "bin": r"model.bin is a pickle-based checkpoint .*convert it to safetensors",
    "missing_shard": r"names 1 shard\(s\) missing from .*-00002-of-\d+\.safetensors; download the missing",
    "sd_like": r"sd15.safetensors is not a CogVideoX transformer: found keys like cond_stage_model\..*, "
               r"first_stage_model\..*; expected keys like blocks.0.norm1.linear.weight or "
               r"transformer_blocks.0.norm1.linear.weight",
    "lora": r"not a CogVideoX transformer: .*looks like a LoRA",
    "incomplete": r"incomplete.safetensors is incomplete: 1 weight\(s\) .*blocks.0.ff_out.weight",
    "bad_index": r"names shards outside its folder",
    "empty_folder": r"holds no transformer weights",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_files_give_clear_errors(models: Path, kind: str) -> None:
    name = _bad_file(models, kind)
    with pytest.raises(ValueError, match=r"CustomVideoXModelLoader \(model_name=.*\): .*" + BAD_FILES[kind]):
        load(name)
    assert not list((models / "bad").glob("UNPICKLED_*"))  # pickles are refused unopened


# --- the schema --------------------------------------------------------------------------------------------


def test_schema_has_tooltips_and_outputs_model(models: Path) -> None:
    schema = ml.CustomVideoXModelLoader.define_schema()
    assert schema.node_id == "CustomVideoXModelLoader" and schema.category == "CustomVideoX" and schema.description
    assert [i.id for i in schema.inputs] == ["model_name", "weight_dtype", "rope"]
    assert all(i.tooltip for i in schema.inputs)
    assert next(i for i in schema.inputs if i.id == "rope").default == "exact"
    assert [o.io_type for o in schema.outputs] == ["MODEL"]


# --- a diffusers folder's config.json --------------------------------------------------------------------


def _config_folder(models: Path, name: str, **config) -> str:
    """A diffusers save_pretrained folder of the tiny 1.0 weights whose config.json says ``config``."""
    folder = models / name
    if not folder.exists():
        peer = DiffusersCogVideoX(**{**tm.diffusers_config(tm.TINY_CONFIG_1_0), **config})
        peer.load_state_dict(tm.native_to_diffusers(tm.build_native_state_dict(tm.TINY_CONFIG_1_0)), strict=True)
        peer.save_pretrained(str(folder), safe_serialization=True)
    folder_paths.filename_list_cache.pop("diffusion_models", None)
    return name + os.sep


@pytest.mark.parametrize("grid", [(16, 24), (20, 20), (24, 32)])
def test_exact_rope_uses_the_training_grid_of_the_folders_config(models: Path, grid: tuple[int, int]) -> None:
    """A model trained at 384x512 (sample 48x64 latents): diffusers builds its RoPE from that grid."""
    name = _config_folder(models, "cvx_tiny_sample_48x64", sample_height=48, sample_width=64)
    peer = DiffusersCogVideoX.from_pretrained(str(models / name))
    assert (peer.config.sample_height, peer.config.sample_width) == (48, 64)
    x, t, ctx = inputs(t=2, h=grid[0], w=grid[1])
    expected = diffusers_forward(peer.eval(), x, t, ctx)
    exact = host_forward(load(name, "exact"), x, t, ctx)
    assert max_diff(exact, expected) < 1e-5 * max(1.0, expected.abs().max().item())
    # The host's default training grid (60x90) gives other positions: the config matters here.
    default_grid = host_forward(rp.install_rotary(load(SHARDED + os.sep, "host"), "exact"), x, t, ctx)
    assert max_diff(default_grid, expected) > 1e-3


def test_a_config_the_weights_contradict_is_a_clear_error(models: Path) -> None:
    name = _config_folder(models, "cvx_tiny_sincos_config", use_rotary_positional_embeddings=False)
    with pytest.raises(ck.CheckpointError, match="CustomVideoXModelLoader.*use_rotary_positional_embeddings=False "
                                                 r"\(the host built True\)"):
        load(name, "exact")

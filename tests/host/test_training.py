"""CustomVideoX adapter training (cvx_core.dataset / cvx_core.training) on the real host's tiny CogVideoX.

The data is synthetic: a coloured square moving over a background, as an mp4 (PyAV), a gif and a folder
of frames, with captions, subject sidecars and masks (one clip without a mask exercises the img-focus
saliency model). The VAE and text encoder are cheap deterministic stand-ins passed as callables (the
training library takes callables by design); the DiT is the host's real tiny CogVideoX with the pack's
reference patch and reference-branch adapter, exactly what the node and the CLI train.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from customvideox.cvx_core import lora
from customvideox.nodes import model_loader
from PIL import Image

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]

SIZE, FRAMES, TEXT_LEN = 32, 9, 8
COLOURS = {"red_box": (230, 40, 40), "green_box": (40, 200, 60), "blue_box": (50, 60, 220)}




def square_video(colour: tuple[int, int, int], background: int, shift: int) -> np.ndarray:
    frames = np.full((FRAMES, SIZE, SIZE, 3), background, np.uint8)
    for i in range(FRAMES):
        x = 2 + (i * 2 + shift) % (SIZE - 12)
        frames[i, 10:20, x:x + 10] = colour
    return frames


def write_mp4(frames: np.ndarray, path: Path) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = {"crf": "10"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cvx_dataset")
    clips = {name: square_video(c, 30 + 40 * i, 3 * i) for i, (name, c) in enumerate(COLOURS.items())}
    write_mp4(clips["red_box"], root / "red_box.mp4")
    Image.fromarray(clips["green_box"][0]).save(root / "green_box.gif", save_all=True, duration=100, loop=0,
                                                append_images=[Image.fromarray(f) for f in clips["green_box"][1:]])
    (root / "blue_box").mkdir()
    for i, f in enumerate(clips["blue_box"]):
        Image.fromarray(f).save(root / "blue_box" / f"{i:03d}.png")
    for name, frames in clips.items():
        (root / f"{name}.txt").write_text(f"a {name.split('_')[0]} box slides to the right", encoding="utf-8")
        if name != "blue_box":  # blue_box: the saliency model makes its mask
            mask = (np.abs(frames[0].astype(int) - frames[0, 0, 0]).sum(-1) > 60).astype(np.uint8) * 255
            Image.fromarray(mask).save(root / f"{name}.mask.png")
    (root / "red_box.subject.txt").write_text("red box", encoding="utf-8")
    (root / "notes.md").write_text("not a clip", encoding="utf-8")
    return root


class StandInEncoders:
    """Deterministic cheap 'VAE' (8x spatial, 4x temporal, 16 channels) and 'text encoder'; counts calls."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.proj = torch.randn(16, 3, generator=g)
        self.vocab: dict[str, torch.Tensor] = {}
        self.calls = 0

    def video(self, frames: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = frames[::4].permute(0, 3, 1, 2) * 2 - 1  # [t, 3, H, W]
        x = torch.nn.functional.avg_pool2d(x, 8)
        return torch.einsum("oc,tchw->othw", self.proj, x)[None]

    def text(self, caption: str) -> torch.Tensor:
        self.calls += 1
        out = torch.zeros(1, TEXT_LEN, 32)
        for i, word in enumerate(caption.split()[:TEXT_LEN]):
            if word not in self.vocab:
                self.vocab[word] = torch.randn(32, generator=torch.Generator().manual_seed(len(self.vocab) + 1))
            out[0, i] = self.vocab[word]
        return out


def load_tiny(tiny_models):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(tiny_models.native_state_dict("native_1_0"))


def prep(host, data_dir: Path, cache: Path, enc: StandInEncoders):
    from customvideox.cvx_core import dataset as ds
    return ds.prepare_dataset(data_dir, cache, enc.video, enc.text,
                              ds.PrepSettings(width=SIZE, height=SIZE, num_frames=FRAMES), subject="box",
                              encoder_id="stand-in")


def test_dataset_prepares_every_layout_and_caches_once(host, dataset_dir, tmp_path):
    enc = StandInEncoders()
    data = prep(host, dataset_dir, tmp_path / "cache", enc)
    assert [c.name for c in data.clips] == ["blue_box", "green_box", "red_box"]
    assert [c.subject for c in data.clips] == ["box", "box", "red box"]
    assert data.clips[0].mask is None and data.clips[2].mask is not None
    for s in data.samples:
        assert s["latent"].shape == (1, 16, 3, 4, 4)
        assert s["reference"].shape == (1, 16, 1, 4, 4)
        assert s["text"].shape == (1, TEXT_LEN, 32)
    assert data.empty_text.shape == (1, TEXT_LEN, 32)
    calls = enc.calls
    again = prep(host, dataset_dir, tmp_path / "cache", enc)
    assert enc.calls == calls, "a second prepare must read the cache, not encode again"
    for a, b in zip(data.samples, again.samples):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_reference_is_the_subject_cut_out_on_white(host):
    from customvideox.cvx_core import dataset as ds
    frame = np.full((SIZE, SIZE, 3), 90, np.uint8)
    frame[10:16, 4:24] = (200, 10, 10)  # wider than tall: padded with white above and below
    mask = (frame[..., 1] < 50).astype(np.float32)
    ref = ds.cut_out_reference(frame, mask, SIZE, SIZE, margin=0.0).numpy() * 255.0  # float 0..1 now
    assert ref.shape == (SIZE, SIZE, 3)
    # Background gone (white), the subject's colour kept and enlarged to fill the frame's width.
    assert (ref[0, 0] == 255).all() and (np.abs(ref[SIZE // 2, SIZE // 2] - (200, 10, 10)) < 30).all()
    assert (np.abs(ref - 90) < 1).all(-1).sum() == 0


def test_dataset_errors_are_clear(host, tmp_path):
    from customvideox.cvx_core import dataset as ds
    (tmp_path / "a.gif").write_bytes(b"")
    with pytest.raises(ds.DatasetError, match="no caption file: a.txt"):
        ds.find_clips(tmp_path)
    (tmp_path / "a.txt").write_text("a dog", encoding="utf-8")
    with pytest.raises(ds.DatasetError, match="no subject word"):
        ds.find_clips(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ds.DatasetError, match="no clips"):
        ds.find_clips(tmp_path / "empty")


def train(host, tiny_models, data, out_dir: Path, **kw):
    from customvideox.cvx_core import lora as lora
    from customvideox.cvx_core import training as tr
    from customvideox.cvx_host import adapters as rb
    from customvideox.cvx_host import training as ta
    model = load_tiny(tiny_models)
    args = dict(steps=300, learning_rate=3e-3, rank=4, alpha=4.0, seed=0, reference_drop=0.0, text_drop=0.0,
                gradient_checkpointing=True, checkpoint_every=0, timestep_min=300, timestep_max=700)
    args.update(kw)
    settings = tr.TrainSettings(**args)
    shapes = lora.block_target_shapes(rb.module_shapes(model), settings.targets)
    adapter = lora.init_adapter(shapes, settings.rank, settings.alpha, seed=settings.seed)
    model_fn, device, dtype, acp = ta.training_model_fn(model, adapter)
    result = tr.train_adapter(settings, data, model_fn, adapter, acp, out_dir, device=device, dtype=dtype,
                              base_model="cvx_tiny_test_model.safetensors", adapter_name="tiny")
    return model, result


def test_training_lowers_the_loss_and_the_adapter_reloads(host, tiny_models, dataset_dir, tmp_path):
    data = prep(host, dataset_dir, tmp_path / "cache", StandInEncoders())
    model, result = train(host, tiny_models, data, tmp_path / "run")
    k = 50
    first, last = np.mean(result.losses[:k]), np.mean(result.losses[-k:])
    assert len(result.losses) == 300 and all(math.isfinite(v) for v in result.losses)
    assert last < 0.85 * first, (first, last)

    with Image.open(result.curve_path) as im:
        assert im.size == (900, 480)
    from customvideox.cvx_core import lora_keys as lk
    sd, metadata, config = lk.read_lora_file(result.adapter_path)
    parsed = lk.parse_lora(sd, metadata, config)
    meta = parsed.meta
    assert (meta.rank, meta.alpha, meta.targets, meta.steps) == (4, 4.0, ("q", "k", "v", "attn_out"), 300)
    assert meta.base_model == "cvx_tiny_test_model.safetensors"
    assert meta.pack_version == lora.pack_version() != "unknown"
    assert len(parsed.pairs) == 2 * 4 and not parsed.unused
    assert all(abs(p.scale - 1.0) < 1e-7 for p in parsed.pairs.values())

    # Reloaded through the loader's code path, it changes the output with the reference on.
    import comfy.model_management as mm
    from customvideox.nodes import adapter_loader as al
    from customvideox.nodes import types as types
    base = load_tiny(tiny_models)
    adapted, report = al.load_adapter(base, str(result.adapter_path), 1.0, "reference_only")
    assert report.modules == 8 and not report.unused
    ref = types.EncodedReference(latent=torch.randn(1, 16, 1, 4, 4), width=SIZE, height=SIZE)
    apply = host.node_classes["CustomVideoXApply"]

    def out(m):
        m = apply.execute(model=m, reference=ref, strength=1.0, block_start=0, block_end=-1, apply_to_uncond=True,
                          attention_mode="two_way", reference_rope="negative").result[0]
        mm.load_models_gpu([m])
        opts = dict(m.model_options["transformer_options"], wrappers=m.wrappers)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            return m.model.diffusion_model(torch.randn(1, 16, 3, 4, 4, generator=g), torch.tensor([500.0]),
                                           torch.randn(1, TEXT_LEN, 32, generator=g), transformer_options=opts)

    assert (out(adapted) - out(base)).abs().max() > 1e-4


def test_resume_continues_the_same_run(host, tiny_models, dataset_dir, tmp_path):
    data = prep(host, dataset_dir, tmp_path / "cache", StandInEncoders())
    kw = dict(checkpoint_every=10, gradient_checkpointing=False, reference_drop=0.3, text_drop=0.3)
    _, straight = train(host, tiny_models, data, tmp_path / "straight", steps=20, **kw)
    _, part = train(host, tiny_models, data, tmp_path / "resumed", steps=10, **kw)
    assert part.resumed_from == 0 and len(part.losses) == 10
    _, resumed = train(host, tiny_models, data, tmp_path / "resumed", steps=20, **kw)
    assert resumed.resumed_from == 10 and len(resumed.losses) == 20
    assert [p.name for p in sorted((tmp_path / "resumed" / "checkpoints").iterdir())] == \
        ["step_0000010.pt", "step_0000020.pt"]
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-5, atol=1e-7)

    from customvideox.cvx_core import training as tr
    with pytest.raises(tr.TrainingError, match="checkpoint .* was made with"):
        train(host, tiny_models, data, tmp_path / "resumed", steps=30, rank=8, **kw)


def test_gradient_checkpointing_gives_the_same_gradients(host, tiny_models, dataset_dir, tmp_path):
    data = prep(host, dataset_dir, tmp_path / "cache", StandInEncoders())
    _, a = train(host, tiny_models, data, tmp_path / "a", steps=5, gradient_checkpointing=True)
    _, b = train(host, tiny_models, data, tmp_path / "b", steps=5, gradient_checkpointing=False)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)


class StubClip:
    """Stands in for the T5 CLIP object (no T5 weights here): the two methods the node calls."""

    def __init__(self) -> None:
        self.enc = StandInEncoders()
        self.cond_stage_model = torch.nn.Linear(2, 2)

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str):
        return [[self.enc.text(tokens), {}]]


def test_train_adapter_node_with_the_hosts_vae(host, host_env, tiny_models, dataset_dir):
    """The node's own glue under the host's inference mode: deep-cloned model, the real (tiny) VAE, the
    adapter saved into models/loras with its metadata, and the loss curve as an IMAGE."""
    import shutil

    import comfy.sd
    import comfy.utils
    import folder_paths

    target = Path(folder_paths.get_input_directory()) / "cvx_train_set"
    target.mkdir(parents=True, exist_ok=True)
    for f in ("red_box.mp4", "red_box.txt", "red_box.mask.png", "red_box.subject.txt"):
        shutil.copy(dataset_dir / f, target / f)
    model = model_loader.load_cogvideox(str(tiny_models.paths["native_1_0"]))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_models.paths["vae"])))
    node = host.node_classes["CustomVideoXTrainAdapter"]
    with torch.inference_mode():
        out = node.execute(model=model, vae=vae, clip=StubClip(), dataset_folder="cvx_train_set", subject="box",
                           adapter_name="cvx_node_trained", steps=3, learning_rate=1e-3, rank=2, alpha=2.0,
                           targets="attention + feed-forward", width=SIZE, height=SIZE, num_frames=FRAMES,
                           frame_stride=1, reference_drop=0.0, text_drop=0.0, gradient_checkpointing=True,
                           checkpoint_every=0, resume=False, seed=0)
    name, curve = out.result
    assert name == "cvx_node_trained.safetensors" and curve.shape == (1, 480, 900, 3)
    from customvideox.cvx_core import lora_keys as lk
    sd, metadata, config = lk.read_lora_file(folder_paths.get_full_path("loras", name))
    meta = lk.parse_lora(sd, metadata, config).meta
    assert (meta.steps, meta.rank, len(meta.targets), meta.base_model) == \
        (3, 2, 6, "cvx_tiny_test_model.safetensors")
    with pytest.raises(ValueError, match="relative to ComfyUI's input folder"):
        node.execute(model=model, vae=vae, clip=StubClip(), dataset_folder="../outside", subject="box",
                     adapter_name="x", steps=1, learning_rate=1e-3, rank=2, alpha=2.0,
                     targets="attention (q,k,v,out)", width=SIZE, height=SIZE, num_frames=FRAMES, frame_stride=1,
                     reference_drop=0.0, text_drop=0.0, gradient_checkpointing=False, checkpoint_every=0,
                     resume=False, seed=0)

"""CustomVideoXReferenceEncode on the host's own VAEs: CogVideoX, Wan 2.1 (16 channels) and Wan 2.2 (48).

Each VAE is built by ``comfy.sd.VAE`` from a tiny random state dict, as VAELoader does. One still image
must give ONE latent frame, and it must be the latent the VAE gives a video starting with that image
(the Wan VAEs are causal: frame 0 is encoded alone). Any other VAE is refused naming the node, the
input and the accepted VAEs. The host builds the Wan 2.2 VAE at width 160 whatever the file holds
(705 M parameters), so its test shrinks the host class's width at construction; the module's encode
code runs unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_wan as tw
import torch
from customvideox.cvx_core.reference_image import prepare_reference
from customvideox.nodes import reference_encode
from customvideox.nodes import types as node_types
from images import photo
from PIL import Image

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]
W, H = 48, 32


def host_vae(sd: dict):
    import comfy.sd

    return comfy.sd.VAE(sd=sd)


def image(n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 40, 60, 3, generator=torch.Generator().manual_seed(seed))


def encode(vae, img: torch.Tensor):
    node = reference_encode.CustomVideoXReferenceEncode
    return node.execute(vae=vae, image=img, width=W, height=H, fit="pad", background="white").result


def wan22_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from comfy.ldm.wan.vae2_2 import WanVAE

    model = WanVAE(dim=16, dec_dim=16, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True], dropout=0.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("gamma") else 0.0) + 0.02 * torch.randn(p.shape, generator=gen))
    return model.state_dict()


@pytest.fixture(scope="module")
def wan22_vae():
    """The host's Wan 2.2 VAE (comfy.sd.VAE picks it by its keys) at width 16 instead of 160."""
    from comfy.ldm.wan import vae2_2

    full_init = vae2_2.WanVAE.__init__

    def narrow_init(self, *args, **kw):
        full_init(self, *args, **{**kw, "dim": 16, "dec_dim": 16})

    mp = pytest.MonkeyPatch()
    mp.setattr(vae2_2.WanVAE, "__init__", narrow_init)
    try:
        return host_vae(wan22_state_dict())
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def wan21_vae():
    return host_vae(tw.build_wan_vae_state_dict(seed=0))


@pytest.fixture(scope="module")
def cogvideox_vae(tiny_models):
    import comfy.utils

    return host_vae(comfy.utils.load_torch_file(str(tiny_models.paths["vae"])))


@pytest.mark.parametrize("name,family,channels,down", [
    ("cogvideox_vae", "CogVideoX", 16, 8), ("wan21_vae", "Wan2.1", 16, 8), ("wan22_vae", "Wan2.2", 48, 16)])
def test_one_still_image_is_one_latent_frame_per_vae(request, name, family, channels, down):
    vae = request.getfixturevalue(name)
    ref, pixels = encode(vae, image(n=2))
    assert ref.family == family and (ref.width, ref.height) == (W, H)
    assert tuple(ref.latent.shape) == (2, channels, 1, H // down, W // down)
    assert torch.isfinite(ref.latent).all() and not torch.equal(ref.latent[0], ref.latent[1])
    assert tuple(pixels.shape) == (2, H, W, 3)


@pytest.mark.parametrize("name", ["wan21_vae", "wan22_vae"])
def test_the_wan_reference_is_the_first_latent_frame_of_a_video_starting_with_it(request, name):
    """Independent of the node's code path: the host's video encode of [image, 4 other frames]."""
    vae = request.getfixturevalue(name)
    ref, pixels = encode(vae, image())
    video = torch.cat([pixels, torch.rand(4, H, W, 3, generator=torch.Generator().manual_seed(5))])
    latent = vae.encode(video)  # 5 frames -> 2 latent frames
    assert latent.shape[2] == 2
    torch.testing.assert_close(ref.latent[:, :, :1], latent[:, :, :1], rtol=1e-5, atol=1e-5)


def taesd_vae():
    import comfy.taesd.taesd

    shapes = comfy.taesd.taesd.TAESD(latent_channels=4).state_dict()
    gen = torch.Generator().manual_seed(0)
    return host_vae({k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in shapes.items()})


@pytest.mark.parametrize("make,what", [(taesd_vae, "comfy.taesd.taesd.TAESD"), (object, "object")])
def test_another_vae_is_refused_naming_the_node_the_input_and_the_accepted_vaes(make, what):
    with pytest.raises(ValueError) as err:
        encode(make(), image())
    msg = str(err.value)
    assert msg.startswith(f"CustomVideoXReferenceEncode vae: {what} is not a CogVideoX VAE nor a Wan VAE")
    for accepted in ("the CogVideoX VAE", "the Wan 2.1 VAE (wan_2.1_vae", "the Wan 2.2 VAE (wan2.2_vae"):
        assert accepted in msg


def test_an_old_encoded_reference_is_cogvideox():
    """References made before the family field existed (e.g. in tests and training code) stay CogVideoX."""
    ref = node_types.EncodedReference(latent=torch.zeros(1, 16, 1, 4, 6), width=W, height=H)
    assert ref.family == "CogVideoX"


@pytest.fixture(scope="module")
def vae(tiny_models):
    import comfy.sd
    import comfy.utils

    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_models.paths["vae"])))


def encode_with_mask(vae, image, mask=None):
    node = reference_encode.CustomVideoXReferenceEncode
    return node.execute(vae=vae, image=image, width=W, height=H, fit="pad", background="white", mask=mask).result


@pytest.mark.host
@pytest.mark.parametrize("bad,mask_n,words", [
    (lambda img: img * 2 - 1, None, "CustomVideoXReferenceEncode: image: values run from -0.99"),
    (lambda img: img.expand(3, -1, -1, -1), 2, "CustomVideoXReferenceEncode: mask: 2 masks for 3"),
])
def test_node_errors_name_the_node_and_the_input(vae, bad, mask_n, words):
    img, _ = photo()
    mask = None if mask_n is None else photo(n=mask_n)[1]
    with pytest.raises(ValueError, match=words):
        encode_with_mask(vae, bad(img), mask)


@pytest.mark.host
def test_node_encodes_grayscale_and_rgba(vae):
    img, mask = photo()
    ref, pixels = encode_with_mask(vae, img.mean(-1, keepdim=True))  # the VAE raised on 1 channel before
    assert pixels.shape == (1, H, W, 3) and ref.latent.shape[1] == 16
    _, rgba_pixels = encode_with_mask(vae, torch.cat([img, mask[..., None]], -1))
    assert torch.equal(rgba_pixels, prepare_reference(img, mask, W, H))


@pytest.mark.host
def test_training_reference_equals_the_encode_nodes_pixels(vae, tmp_path: Path):
    from customvideox.cvx_core import dataset as ds
    g = np.random.default_rng(0)
    frames = (g.random((5, H, W, 3)) * 120).astype(np.uint8)
    frames[:, 6:22, 10:30] = (230, 200, 40)  # the subject, a yellow box
    mask = np.zeros((H, W), np.uint8)
    mask[6:22, 10:30] = 255
    (tmp_path / "clip").mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / "clip" / f"{i:03d}.png")
    Image.fromarray(mask).save(tmp_path / "clip.mask.png")
    (tmp_path / "clip.txt").write_text("a yellow box", encoding="utf-8")
    encoded: list[torch.Tensor] = []

    def encode_video(x: torch.Tensor) -> torch.Tensor:
        encoded.append(x.clone())
        return torch.zeros(1, 16, 1, 4, 6)

    settings = ds.PrepSettings(width=W, height=H, num_frames=5)
    ds.prepare_dataset(tmp_path, tmp_path / "cache", encode_video, lambda text: torch.zeros(1, 4, 8), settings,
                       subject="box")
    video, training_ref = encoded
    first = ds.read_frames(ds.find_clips(tmp_path, "box")[0], settings)[0]
    assert torch.equal(video[0], torch.from_numpy(first).float() / 255.0)  # the frame the reference is cut from
    _, node_pixels = encode_with_mask(vae, torch.from_numpy(first)[None].float() / 255.0,
                            torch.from_numpy(mask.astype(np.float32) / 255.0)[None])
    assert torch.equal(training_ref, node_pixels)
    # and it is the cut-out: white where the background was
    assert torch.equal(node_pixels[0, :, 0], torch.ones(H, 3))

"""CustomVideoXReferenceEncode on the host's own VAEs: CogVideoX, Wan 2.1 (16 channels) and Wan 2.2 (48).

Each VAE is built by ``comfy.sd.VAE`` from a tiny random state dict, as VAELoader does. One still image
must give ONE latent frame, and it must be the latent the VAE gives a video starting with that image
(the Wan VAEs are causal: frame 0 is encoded alone). Any other VAE is refused naming the node, the
input and the accepted VAEs. The host builds the Wan 2.2 VAE at width 160 whatever the file holds
(705 M parameters), so its test shrinks the host class's width at construction; the module's encode
code runs unchanged.
"""

from __future__ import annotations

import pytest
import tiny_wan as tw
import torch
from pack_import import pack_module

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]
W, H = 48, 32


def host_vae(sd: dict):
    import comfy.sd

    return comfy.sd.VAE(sd=sd)


def image(n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 40, 60, 3, generator=torch.Generator().manual_seed(seed))


def encode(vae, img: torch.Tensor):
    node = pack_module("nodes.reference_encode").CustomVideoXReferenceEncode
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
    ref = pack_module("nodes.types").EncodedReference(latent=torch.zeros(1, 16, 1, 4, 6), width=W, height=H)
    assert ref.family == "CogVideoX"

"""One reference preprocessing for training and inference, and reference images outside what the VAE expects.

The training sample's reference (cvx_core.dataset, from a clip's first frame and its mask file) must be
the very pixels CustomVideoXReferenceEncode encodes for that frame and mask at its defaults. Inputs a
user can make (0-255 values, RGBA, grayscale, mismatched mask batches) are converted where the intent
is clear, and otherwise refused with an error naming the node and the input.
"""

from __future__ import annotations

import pytest
import torch
from customvideox.cvx_core.reference_image import ReferenceImageError, prepare_reference
from images import photo

W, H = 48, 32  # the "video" size


# ---------------------------------------------------------------- host-free: the conversions


def test_a_mask_cuts_the_subject_out_on_white_cropped_to_its_box():
    img, mask = photo()
    out = prepare_reference(img, mask, W, H)
    assert out.shape == (1, H, W, 3)
    # box 16x16 (+10 %: 18x18) fitted into 48x32: the subject fills the height, white at the sides
    assert torch.equal(out[0, :, 0], torch.ones(H, 3)) and torch.equal(out[0, :, -1], torch.ones(H, 3))
    centre = out[0, H // 2, W // 2]
    assert torch.allclose(centre, torch.tensor([0.9, 0.3, 0.1]), atol=1e-3), centre
    # no background noise (values < 0.5 in every channel) survives
    assert not bool(((out < 0.5).all(-1)).any())


def test_0_255_values_and_uint8_give_the_0_1_result():
    img, mask = photo()
    want = prepare_reference(img, mask, W, H)
    assert torch.allclose(prepare_reference(img * 255.0, mask, W, H), want, atol=1e-6)
    u8 = (img * 255).round().to(torch.uint8)
    assert torch.allclose(prepare_reference(u8, mask, W, H), prepare_reference(u8.float() / 255, mask, W, H), atol=1e-6)
    assert torch.allclose(prepare_reference(img, mask * 255.0, W, H), want, atol=1e-6)


def test_rgba_alpha_is_the_subject_mask_unless_a_mask_is_given_or_it_is_opaque():
    img, mask = photo()
    rgba = torch.cat([img, mask[..., None]], -1)
    assert torch.equal(prepare_reference(rgba, None, W, H), prepare_reference(img, mask, W, H))
    opaque = torch.cat([img, torch.ones_like(mask)[..., None]], -1)
    assert torch.equal(prepare_reference(opaque, None, W, H), prepare_reference(img, None, W, H))
    other = torch.zeros_like(mask)
    other[:, 20:36, 4:20] = 1.0
    assert torch.equal(prepare_reference(rgba, other, W, H), prepare_reference(img, other, W, H))
    with pytest.raises(ReferenceImageError, match="image: its alpha channel is fully transparent"):
        prepare_reference(torch.cat([img, torch.zeros_like(mask)[..., None]], -1), None, W, H)


def test_grayscale_becomes_rgb():
    img, mask = photo()
    grey = img.mean(-1, keepdim=True)
    out = prepare_reference(grey, mask, W, H)
    assert out.shape == (1, H, W, 3)
    assert torch.equal(out, prepare_reference(grey.expand(-1, -1, -1, 3), mask, W, H))
    la = torch.cat([grey, mask[..., None]], -1)  # grayscale + alpha
    assert torch.equal(prepare_reference(la, None, W, H), out)


@pytest.mark.parametrize("images,masks,ok", [(3, 1, True), (3, 3, True), (3, 2, False), (1, 2, False)])
def test_mask_batches(images, masks, ok):
    img, _ = photo(n=images)
    _, mask = photo(n=masks)
    if ok:
        assert prepare_reference(img, mask, W, H).shape == (images, H, W, 3)
    else:
        with pytest.raises(ReferenceImageError, match=f"mask: {masks} masks for {images} reference image"):
            prepare_reference(img, mask, W, H)


@pytest.mark.parametrize("bad,words", [
    (lambda img: img * 2 - 1, "image: values run from -0.99"),
    (lambda img: img * 1000, "to 900; expected 0..1"),
    (lambda img: img[..., :1].expand(-1, -1, -1, 5), "image: has 5 channels"),
    (lambda img: img[0], "image: has shape (40, 60, 3)"),
])
def test_ambiguous_images_are_refused(bad, words):
    img, _ = photo()
    with pytest.raises(ReferenceImageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        prepare_reference(bad(img), None, W, H)


# ---------------------------------------------------------------- the node and the training data











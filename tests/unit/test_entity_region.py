"""ERAE: entity tokens (also with the host's real T5 tokenizer), attention maps, masks, memory."""

import json

import pytest
import torch
from customvideox.cvx_core.entity_region import (
    EntityRegion,
    entity_map_from_attention,
    find_entity_tokens,
    ids_from_token_weights,
    mask_to_token_map,
    refine_map,
)
from torch.profiler import ProfilerActivity, profile

# --- entity tokens, id level ----------------------------------------------------------------------

EOS, PAD = 1, 0


def test_find_entity_tokens_all_pieces_all_occurrences_no_specials():
    prompt = [3, 9, 4301, 122, 23, 1782, 5, 4301, 122, 23, EOS, PAD, PAD]
    assert find_entity_tokens(prompt, [[4301, 122, 23]], ["corgi"], {EOS, PAD}) == [2, 3, 4, 7, 8, 9]
    assert find_entity_tokens(prompt, [[4301, 122, 23, EOS], [1782]], ["corgi", "dog"], {EOS, PAD}) == [
        2,
        3,
        4,
        5,
        7,
        8,
        9,
    ]


def test_bare_form_only_counts_after_a_boundary_token():
    # "corgi-dog hotdog": "-" (18) precedes the bare "dog" (10169); "▁hot" (1312) does not count
    prompt = [4301, 122, 23, 18, 10169, 1312, 10169, EOS, PAD]
    kwargs = {"bare_word_ids": [[[10169]]], "prompt": "corgi-dog hotdog"}
    assert find_entity_tokens(prompt, [[1782]], ["dog"], {EOS, PAD}, boundary_ids={18}, **kwargs) == [4]
    with pytest.raises(ValueError, match="not in the prompt"):
        find_entity_tokens(prompt, [[1782]], ["dog"], {EOS, PAD}, boundary_ids=set(), **kwargs)


def test_filler_pieces_match_in_place_but_are_never_returned():
    UNK, SPACE = 2, 3  # T5's <unk> and bare "▁"
    prompt = [SPACE, 9, SPACE, UNK, 3154, SPACE, UNK, 6, EOS, PAD]  # "a <emoji> runs <emoji>."
    kwargs = {"filler_ids": {UNK, SPACE}}
    with pytest.raises(ValueError, match='"x" cannot be spelled.*mask'):
        find_entity_tokens(prompt, [[SPACE, UNK]], ["x"], {EOS, PAD}, **kwargs)
    # "▁ läuft": the bare "▁" is part of the form but not returned
    assert find_entity_tokens([SPACE, 15241, EOS], [[SPACE, 15241]], ["läuft"], {EOS}, **kwargs) == [1]
    # a form with a filler inside ("▁Zo <unk>") matches only where the prompt has the <unk> too
    assert find_entity_tokens([6226, UNK, 6226, 9, EOS], [[6226, UNK]], ["Zoë"], {EOS}, **kwargs) == [0]


def test_unknown_word_error_names_word_prompt_and_what_to_do():
    long_prompt = "a photo of a corgi dog running on the beach " * 4
    with pytest.raises(ValueError) as info:
        find_entity_tokens([3, 9, 1202, EOS, PAD], [[1712]], ["cat"], {EOS, PAD}, prompt=long_prompt)
    msg = str(info.value)
    assert '"cat"' in msg and "a photo of a corgi dog" in msg and "..." in msg
    assert "use a word that appears in the prompt" in msg and "switch the region mode to mask" in msg
    with pytest.raises(ValueError, match="no text tokens"):
        find_entity_tokens([3, 9, EOS], [[EOS]], ["</s>"], {EOS, PAD})
    with pytest.raises(ValueError, match="no entity word"):
        find_entity_tokens([3, 9, EOS], [], [], {EOS, PAD})


def test_ids_from_host_token_weight_pairs():
    pairs = [(3, 1.0, 1), (9, 1.2, 1), (torch.zeros(4), 1.0, 2), (1, 1.0, 0)]
    assert ids_from_token_weights(pairs) == [3, 9, -1, 1]


# --- entity tokens with the host's real T5 tokenizer ----------------------------------------------


















# --- attention map --------------------------------------------------------------------------------


def synthetic_qk(grid, region, n_text=8, entity=3, heads=2, dim=16, seed=0):
    """q/k on [text | video] where video tokens inside `region` point at the entity's key."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    sv = t * h * w
    k = torch.randn(1, heads, n_text + sv, dim, generator=g) * 0.3
    q = torch.randn(1, heads, n_text + sv, dim, generator=g) * 0.3
    direction = torch.randn(heads, dim, generator=g)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    k[0, :, entity] = 4.0 * direction
    inside = region.reshape(-1)
    q[0, :, n_text:][:, inside] += 4.0 * direction[:, None, :]
    return q, k


def test_entity_map_finds_the_region():
    grid = (3, 8, 10)
    region = torch.zeros(grid, dtype=torch.bool)
    region[:, 2:6, 3:8] = True
    q, k = synthetic_qk(grid, region)
    emap = entity_map_from_attention(q, k, (0, 8), (8, 8 + 240), [3], grid)
    assert emap.shape == (1, 240) and emap.dtype == torch.float32
    assert float(emap.min()) >= 0.0 and float(emap.max()) <= 1.0
    frac = region[0].float().mean().item()
    hard = refine_map(emap, grid, mode="top_k", top_k=frac).reshape(grid).bool()
    iou = (hard & region).sum() / (hard | region).sum()
    assert iou > 0.9
    per_frame_max = emap.reshape(3, -1).amax(-1)
    assert torch.allclose(per_frame_max, torch.ones(3))  # normalised per frame
    assert emap.reshape(grid)[region].mean() > 0.8 and emap.reshape(grid)[~region].mean() < 0.2


def test_entity_map_matches_a_dense_reference_and_flat_frames_are_zero():
    grid = (2, 3, 4)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 5 + 24, 8, generator=g), torch.randn(2, 3, 5 + 24, 8, generator=g)
    emap = entity_map_from_attention(q, k, (0, 5), (5, 29), [1, 2], grid, scale=0.5, norm="minmax")
    probs = torch.softmax(q[:, :, 5:] @ k[:, :, :5].transpose(-1, -2) * 0.5, dim=-1)
    raw = probs[..., [1, 2]].sum(-1).mean(1).reshape(2, 2, 12)
    ref = (raw - raw.amin(-1, keepdim=True)) / (raw.amax(-1, keepdim=True) - raw.amin(-1, keepdim=True))
    assert torch.allclose(emap, ref.reshape(2, 24), atol=1e-5)
    flat = entity_map_from_attention(torch.zeros(1, 1, 29, 8), k[:1, :1], (0, 5), (5, 29), [1], grid)
    assert torch.equal(flat, torch.zeros(1, 24))


def test_entity_map_argument_errors():
    q = torch.zeros(1, 2, 20, 8)
    with pytest.raises(ValueError, match="12 video tokens but the grid 2x2x2 holds 8"):
        entity_map_from_attention(q, q, (0, 8), (8, 20), [0], (2, 2, 2))
    with pytest.raises(ValueError, match="within the 8 text tokens"):
        entity_map_from_attention(q, q, (0, 8), (8, 20), [8], (3, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, H, S, D\]"):
        entity_map_from_attention(q[0], q, (0, 8), (8, 20), [0], (3, 2, 2))


def peak_cpu_bytes(fn, tmp_path):
    """Peak bytes allocated by `fn` above the start, from the profiler's CPU allocator records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = tmp_path / "erae_memory_trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    path.unlink()
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: e["ts"],
    )
    assert mem, "the profiler recorded no CPU allocation"
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - start


def test_entity_map_peak_memory_at_480x720x49_geometry(tmp_path):
    # Real CogVideoX geometry (13 x 30 x 45 video tokens, 1,350 reference, 226 text); 3 heads keep it fast.
    t, h, w = 13, 30, 45
    n_text, n_ref, sv, dim, heads, ents = 226, 1350, t * h * w, 64, 3, 3
    s = n_text + n_ref + sv
    q = torch.randn(1, heads, s, dim, dtype=torch.bfloat16)
    k = torch.randn(1, heads, s, dim, dtype=torch.bfloat16)
    box = {}

    def run():
        box["map"] = entity_map_from_attention(q, k, (0, n_text), (n_text + n_ref, s), [5, 6, 7], (t, h, w))

    peak = peak_cpu_bytes(run, tmp_path)
    bound = 4 * (sv * n_text + sv * dim + n_text * dim + sv * ents + 4 * sv)  # the docstring's bound, B = 1
    one_head_logits = 4 * sv * n_text
    assert box["map"].shape == (1, sv)
    assert one_head_logits < peak <= bound, (peak, bound)
    assert peak < 2 * one_head_logits  # never two [Sv, St] buffers at once, never all heads


# --- masks ----------------------------------------------------------------------------------------


def test_half_white_mask_any_size_gives_half_ones():
    mask = torch.zeros(480, 736)
    mask[:, :360] = 1.0
    tmap = mask_to_token_map(mask, (13, 30, 46))  # 16 px per token: column 22 (px 352..367) is half white
    frames = tmap.reshape(13, 30, 46)
    assert torch.equal(frames[:, :, :22], torch.ones(13, 30, 22))
    assert torch.equal(frames[:, :, 23:], torch.zeros(13, 30, 23))
    assert torch.equal(frames[:, :, 22], torch.full((13, 30), 0.5))
    small = mask_to_token_map(torch.tensor([[1.0, 0.0]]), (2, 4, 8))  # 1x2 upscaled
    assert torch.equal(small.reshape(2, 4, 8)[..., :4], torch.ones(2, 4, 4))
    assert torch.equal(small.reshape(2, 4, 8)[..., 4:], torch.zeros(2, 4, 4))
    # within 1% of the video's aspect ratio (the encode node's rule): resized, not refused
    assert mask_to_token_map(torch.ones(480, 725), (13, 30, 45)).shape == (13 * 30 * 45,)


def test_mask_with_another_aspect_ratio_is_refused_not_stretched():
    # a 720x480 video (45x30 tokens): a square mask, or a 1% wider one, would be stretched
    for h, w in ((480, 480), (480, 728), (64, 16)):
        with pytest.raises(ValueError) as info:
            mask_to_token_map(torch.ones(h, w), (13, 30, 45))
        msg = str(info.value)
        assert f"the mask is {w}x{h}" in msg and "720x480" in msg and "aspect" in msg and "stretched" in msg


def test_mask_frames_per_latent_and_per_video_frame():
    grid = (3, 2, 2)
    per_latent = torch.stack([torch.full((8, 8), v) for v in (0.1, 0.5, 0.9)])
    assert torch.allclose(
        mask_to_token_map(per_latent, grid).reshape(3, 4)[:, 0], torch.tensor([0.1, 0.5, 0.9])
    )
    # 9 video frames → latent 0 ← frame 0, latent 1 ← frames 1..4, latent 2 ← frames 5..8 (averaged)
    per_video = torch.stack([torch.full((8, 8), float(f) / 10) for f in range(9)])
    got = mask_to_token_map(per_video, grid).reshape(3, 4)[:, 0]
    assert torch.allclose(got, torch.tensor([0.0, 0.25, 0.65]))
    # CogVideoX 1.5 style: 3 token frames from 17 video frames (5 latents, padded to 6, temporal patch 2)
    got15 = mask_to_token_map(torch.ones(17, 4, 4), (3, 2, 2), latent_frames=5)
    assert torch.equal(got15, torch.ones(12))
    with pytest.raises(ValueError) as info:
        mask_to_token_map(torch.ones(5, 8, 8), grid)
    for word in (
        "mask has 5 frames",
        "expected 1",
        "3 (one per latent token frame)",
        "9 (one per video frame",
    ):
        assert word in str(info.value)
    with pytest.raises(ValueError, match=r"expected \[H, W\]"):
        mask_to_token_map(torch.ones(1, 1, 8, 8), grid)


def test_per_video_frame_mask_on_cogvideox_1_5_geometry():
    # 9 video frames -> 3 latent frames (VAE: frame 0, frames 1..4, frames 5..8); the host pads them to 4
    # and the DiT patches 2 latent frames per token frame: token frame 0 <- latents 0, 1 <- video frames
    # 0..4; token frame 1 <- latent 2 (+ padding) <- video frames 5..8.
    per_video = torch.stack([torch.full((8, 8), float(f)) for f in range(9)]) / 10
    got = mask_to_token_map(per_video, (2, 2, 2), latent_frames=3).reshape(2, 4)[:, 0]
    assert torch.allclose(got, torch.tensor([(0 + 1 + 2 + 3 + 4) / 50, (5 + 6 + 7 + 8) / 40]))
    # 4 latent frames (13 video frames, no padding) -> token frames from video frames 0..4 and 5..12
    ramp = torch.ones(13, 8, 8) * torch.arange(13.0)[:, None, None] / 20
    got = mask_to_token_map(ramp, (2, 2, 2), latent_frames=4).reshape(2, 4)[:, 0]
    assert torch.allclose(got, torch.tensor([sum(range(5)) / 100, sum(range(5, 13)) / 160]))
    assert torch.allclose(mask_to_token_map(per_video[:2], (2, 2, 2), latent_frames=3).reshape(2, 4)[:, 0],
                          per_video[:2, 0, 0])  # one per token frame
    with pytest.raises(ValueError) as info:
        mask_to_token_map(torch.ones(5, 8, 8), (2, 2, 2), latent_frames=3)
    assert "mask has 5 frames" in str(info.value) and "2 (one per latent token frame)" in str(info.value)
    assert "9 (one per video frame" in str(info.value)


def test_empty_mask_is_a_clear_error():
    with pytest.raises(ValueError, match="the mask is empty: paint the subject's region, or use auto mode"):
        mask_to_token_map(torch.zeros(1, 64, 64), (2, 4, 4))


# --- refine, settings, bias -----------------------------------------------------------------------


def test_refine_top_k_and_smoothing():
    grid = (2, 4, 5)
    x = torch.arange(40, dtype=torch.float32) / 40
    hard = refine_map(x, grid, mode="top_k", top_k=0.25)
    assert hard.shape == (40,) and hard.reshape(2, 20).sum(-1).tolist() == [5.0, 5.0]
    assert torch.equal(hard.reshape(2, 20)[:, -5:], torch.ones(2, 5))
    assert torch.allclose(refine_map(torch.full((3, 40), 0.7), grid, smooth=3), torch.full((3, 40), 0.7))
    spike = torch.zeros(20)
    spike[7] = 1.0  # row 1, col 2 of a 4x5 frame
    smoothed = refine_map(spike, (1, 4, 5), smooth=3).reshape(4, 5)
    assert torch.allclose(smoothed[0:3, 1:4], torch.full((3, 3), 1 / 9)) and smoothed.sum() == pytest.approx(
        1.0
    )
    assert torch.equal(refine_map(x, grid), x)
    for kwargs, word in (({"mode": "hard"}, '"hard"'), ({"top_k": 0.0}, "top_k 0.0"), ({"smooth": 4}, "odd")):
        with pytest.raises(ValueError, match=word):
            refine_map(x, grid, **kwargs)


def test_entity_region_validation_and_refined():
    r = EntityRegion(entity_idx=[6, 7], lam=2.0, refine="top_k", top_k=0.5)
    assert r.entity_idx == (6, 7) and r.mode == "auto"
    assert r.refined(torch.tensor([0.1, 0.9, 0.2, 0.8]), (1, 2, 2)).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert EntityRegion(mode="mask", mask=torch.ones(4, 4)).mask is not None
    cases = [
        ({"mode": "box", "entity_idx": [1]}, '"box"'),
        ({}, "auto needs the entity's token positions"),
        ({"entity_idx": [-1]}, "negative"),
        ({"mode": "mask"}, "mask needs a MASK"),
        ({"entity_idx": [1], "lam": -1.0}, "λ = -1.0.*>= 0"),
        ({"entity_idx": [1], "lam": float("inf")}, "finite"),
        ({"entity_idx": [1], "map_block": -1}, "map_block -1"),
        ({"entity_idx": [1], "refine": "hard"}, '"hard"'),
        ({"entity_idx": [1], "smooth": 2}, "smooth 2"),
    ]
    for kwargs, word in cases:
        with pytest.raises(ValueError, match=word):
            EntityRegion(**kwargs)

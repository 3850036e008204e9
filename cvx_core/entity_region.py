"""ERAE: entity region-aware enhancement (DESIGN.md §1.3).

The reference bias is raised where the subject's words attend most: a per-video-token map in [0, 1]
(from the video queries' attention to the entity's text tokens, or from a user MASK) becomes an extra
``λ · map`` on the video-query → reference-key logits of later blocks.

Host-free: plain torch. Tokenizers are passed in (any Hugging Face-style tokenizer, e.g. the one
inside the host's T5 tokenizer wrapper).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .image_ops import has_subject, same_aspect

REGION_MODES = ("auto", "mask")
REFINE_MODES = ("soft", "top_k")
MAP_NORMS = ("relative", "minmax")
# "relative" normalisation: a token attending (1 + MAP_CONTRAST) x its frame's mean gets the full λ.
MAP_CONTRAST = 1.0
# Default block whose attention gives the auto map (both the node and the core): an early block, which
# already localises nouns and leaves most blocks to use the map.
MAP_BLOCK = 2
# Default sampling progress from which ERAE applies: the first steps' latent is nearly pure noise, so an
# auto map read from it is noise too (and the layout is still forming).
ERAE_START = 0.1
# Pieces a word may follow directly, without a space (sentencepiece then drops the word's "▁").
_PUNCT_PREFIXES = ("(", '"', "'", "-", "/", "[", ",", ".")


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _positions_of(seq: Sequence[int], pattern: Sequence[int]) -> list[int]:
    n = len(pattern)
    return [i for i in range(len(seq) - n + 1) if list(seq[i : i + n]) == list(pattern)]


def find_entity_tokens(
    prompt_ids: Sequence[int],
    word_ids: Sequence[Sequence[int]],
    words: Sequence[str],
    special_ids: Collection[int],
    *,
    alt_word_ids: Sequence[Sequence[Sequence[int]]] | None = None,
    bare_word_ids: Sequence[Sequence[Sequence[int]]] | None = None,
    boundary_ids: Collection[int] = (),
    filler_ids: Collection[int] = (),
    prompt: str = "",
) -> list[int]:
    """Sorted prompt positions of every occurrence of each word's token sequence.

    ``prompt_ids``: the prompt's token ids as the host's tokenizer gives them (EOS and padding
    included); positions index this list, i.e. they are relative to the first text token.
    ``word_ids[i]``: ``words[i]`` tokenized alone, special tokens stripped; every piece of a
    multi-piece word is returned. Optional extra forms per word: ``alt_word_ids[i]`` match anywhere
    (e.g. case variants); ``bare_word_ids[i]`` (the form sentencepiece gives right after punctuation,
    without the leading "▁") match only right after a token in ``boundary_ids``, so a bare piece inside
    a longer word ("▁hot|dog") is not taken for the word. ``special_ids`` positions (EOS, padding) are
    never returned. ``filler_ids`` (a bare "▁", ``<unk>``) may be part of a form, which then matches
    only where the prompt has them too, but are never returned: they carry no meaning of the word,
    and every unspellable word (CJK, emoji) becomes the same ``▁ <unk>``. A word whose form has no
    other piece, or that is found nowhere, raises ValueError naming it and the prompt.
    """
    if len(word_ids) != len(words):
        raise ValueError(f"got {len(words)} words but {len(word_ids)} token sequences: expected one per word")
    if not words:
        raise ValueError("no entity word given: name the subject's word(s) from the prompt, or use mask mode")
    special = set(special_ids)
    boundary = set(boundary_ids)
    filler = set(filler_ids)
    seq = [int(t) for t in prompt_ids]
    found: set[int] = set()
    for i, word in enumerate(words):
        anywhere = [word_ids[i], *(alt_word_ids[i] if alt_word_ids is not None else ())]
        after_punct = bare_word_ids[i] if bare_word_ids is not None else ()
        pieces = [t for t in word_ids[i] if t not in special]
        if not pieces:
            raise ValueError(f'entity word "{word}" gives no text tokens: expected a word from the prompt')
        if all(t in filler for t in pieces):
            raise ValueError(
                f'entity word "{word}" cannot be spelled by the text encoder\'s tokenizer (it becomes unknown '
                "pieces), so its place in the prompt cannot be found: name the subject with a word the T5 "
                "tokenizer knows (e.g. in English, in the prompt too), or switch the region mode to mask"
            )
        hits: list[int] = []
        for forms, needs_boundary in ((anywhere, False), (after_punct, True)):
            for form in forms:
                pattern = [int(t) for t in form if t not in special]
                if all(t in filler for t in pattern):
                    continue
                for p in _positions_of(seq, pattern) if pattern else ():
                    if not needs_boundary or (p > 0 and seq[p - 1] in boundary):
                        hits.extend(q for q in range(p, p + len(pattern)) if seq[q] not in filler)
        if not hits:
            where = f'the prompt "{_shorten(prompt)}"' if prompt else "the prompt's tokens"
            raise ValueError(
                f'entity word "{word}" is not in {where}: use a word that appears in the prompt, '
                "or switch the region mode to mask"
            )
        found.update(hits)
    return sorted(found)


def _is_punct_piece(piece: str) -> bool:
    core = piece.lstrip("▁")
    return bool(core) and not any(ch.isalnum() for ch in core)


def entity_tokens_with_tokenizer(
    prompt_ids: Sequence[int], words: Sequence[str], tokenizer: Any, prompt: str = ""
) -> list[int]:
    """:func:`find_entity_tokens` with every word form built by a Hugging Face-style tokenizer.

    Uses ``tokenizer(text)["input_ids"]``, ``tokenizer.convert_ids_to_tokens``,
    ``tokenizer.all_special_ids`` and ``tokenizer.unk_token_id`` (the host's T5 wrapper keeps such a
    tokenizer as ``.tokenizer``). Forms tried per word: as given, lower-case and capitalised ("Dog" at a
    sentence start), and each of those right after punctuation ("corgi-dog", '"dog"'), where
    sentencepiece drops the leading "▁" and may split differently — so that form is tokenized for real
    (``"(" + word`` minus the tokens of ``"("``) and only accepted after a punctuation piece of the
    prompt. ``<unk>`` and bare "▁" pieces are fillers: matched in place, never returned.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(tokenizer.all_special_ids) - {unk}

    def ids_of(text: str) -> list[int]:
        return [t for t in tokenizer(text)["input_ids"] if t not in special]

    word_ids, alt_word_ids, bare_word_ids = [], [], []
    for word in words:
        word = word.strip()
        forms = list(dict.fromkeys([word, word.lower(), word[:1].upper() + word[1:]]))
        bare = []
        for form in forms:
            for punct in _PUNCT_PREFIXES:
                prefix, joined = ids_of(punct), ids_of(punct + form)
                if joined[: len(prefix)] == prefix and len(joined) > len(prefix):
                    bare.append(joined[len(prefix) :])
        word_ids.append(ids_of(word))
        alt_word_ids.append([ids_of(form) for form in forms[1:]])
        bare_word_ids.append(bare)
    distinct = sorted({int(t) for t in prompt_ids if int(t) >= 0})  # -1 marks an embedding entry
    pieces = dict(zip(distinct, tokenizer.convert_ids_to_tokens(distinct)))
    boundary = {t for t, piece in pieces.items() if _is_punct_piece(piece)}
    in_words = sorted({t for ids in (*word_ids, *sum(alt_word_ids, []), *sum(bare_word_ids, [])) for t in ids})
    pieces.update(zip(in_words, tokenizer.convert_ids_to_tokens(in_words)))
    filler = {t for t, piece in pieces.items() if t == unk or not piece.strip("▁")}
    return find_entity_tokens(
        prompt_ids,
        word_ids,
        words,
        special,
        alt_word_ids=alt_word_ids,
        bare_word_ids=bare_word_ids,
        boundary_ids=boundary,
        filler_ids=filler,
        prompt=prompt,
    )


def ids_from_token_weights(pairs: Sequence[Sequence[Any]]) -> list[int]:
    """Token ids from the host's ``clip.tokenize(text)["t5xxl"][0]`` list of ``(id, weight[, word])``.

    Embedding entries (tensors instead of ids) become -1, which matches no word.
    """
    return [int(p[0]) if isinstance(p[0], int) else -1 for p in pairs]


def _check_grid(grid: tuple[int, int, int], n: int | None = None) -> tuple[int, int, int]:
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(
            f"token grid {tuple(grid)} is invalid: expected (frames, height, width) in tokens, all >= 1"
        )
    t, h, w = (int(g) for g in grid)
    if n is not None and n != t * h * w:
        raise ValueError(
            f"the map has {n} video tokens but the grid {t}x{h}x{w} holds {t * h * w}: expected equal counts"
        )
    return t, h, w


def entity_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    text_range: tuple[int, int],
    video_range: tuple[int, int],
    entity_idx: Sequence[int],
    grid: tuple[int, int, int],
    scale: float | None = None,
) -> torch.Tensor:
    """How much each video query attends to the entity's text tokens: ``[B, T*h*w]`` float32, raw
    (not normalised; :func:`normalize_entity_map` makes the map).

    ``q``, ``k``: ``[B, H, S, D]`` on the joint sequence, post-RoPE, as inside the attention call;
    ``text_range``/``video_range``: ``[start, end)`` of the text and video tokens in S;
    ``entity_idx``: positions relative to ``text_range[0]`` (as :func:`find_entity_tokens` gives).
    Per head: softmax of the video queries' logits over the text keys only, summed over the entity
    columns; then the mean over heads. [reconstructed] (DESIGN.md §1.3).

    Computed per batch element: an unconditional row whose prompt lacks the entity gives a
    meaningless map, so callers use the positive prompt's map for every row.

    Memory: heads run one at a time, in place; peak extra allocation is at most
    ``4 · B · (Sv·St + Sv·D + St·D + Sv·E + 4·Sv)`` bytes (one head's float32 logits plus float32
    copies of its q/k slices), with Sv, St, E the video, text and entity token counts.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be [B, H, S, D] with equal B, H and D"
        )
    t0, t1 = (int(x) for x in text_range)
    v0, v1 = (int(x) for x in video_range)
    if not (0 <= t0 < t1 <= k.shape[2] and 0 <= v0 < v1 <= q.shape[2]):
        raise ValueError(
            f"text_range {text_range} / video_range {video_range} do not fit the sequence of "
            f"{q.shape[2]} tokens: expected [start, end) ranges inside it"
        )
    _check_grid(grid, v1 - v0)
    positions = [int(i) for i in entity_idx]
    if not positions or min(positions) < 0 or max(positions) >= t1 - t0:
        raise ValueError(
            f"entity_idx {positions} must be non-empty positions within the {t1 - t0} text tokens"
        )
    idx = torch.tensor(positions, dtype=torch.long, device=q.device)
    batch, heads, _, dim = q.shape
    scale = dim**-0.5 if scale is None else float(scale)
    acc = torch.zeros(batch, v1 - v0, dtype=torch.float32, device=q.device)
    for head in range(heads):
        qh = q[:, head, v0:v1].to(torch.float32, copy=True).mul_(scale)
        kh = k[:, head, t0:t1].to(torch.float32)
        logits = torch.bmm(qh, kh.transpose(1, 2))  # [B, Sv, St]: the one large buffer
        del qh, kh
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        acc += logits.index_select(-1, idx).sum(-1) / logits.sum(-1)
        del logits
    return acc.div_(heads)


def normalize_entity_map(
    attention: torch.Tensor, grid: tuple[int, int, int], norm: str = "relative", contrast: float = MAP_CONTRAST
) -> torch.Tensor:
    """Per-frame normalisation of :func:`entity_attention` ``[B, T*h*w]`` to a map in [0, 1].

    ``"relative"`` (default, reconstructed): ``clamp((a - mean) / (contrast · mean), 0, 1)`` per frame,
    the excess over the frame's mean attention relative to that mean. A frame with no preference (even
    with small ripples) stays near 0, so ERAE invents no region; a token attending ``1 + contrast``
    times the frame average (twice, at the default) or more gets the full λ. ``"minmax"``: per-frame
    min-max, which stretches any ripple to 0..1 (exactly flat frames give 0).
    """
    if norm not in MAP_NORMS:
        raise ValueError(f'map normalisation "{norm}" is unknown (expected one of {", ".join(MAP_NORMS)})')
    t, h, w = _check_grid(grid, attention.shape[-1])
    frames = attention.to(torch.float32).reshape(-1, t, h * w)
    if norm == "relative":
        mean = frames.mean(dim=-1, keepdim=True)
        return ((frames - mean) / (contrast * mean).clamp_min(1e-12)).clamp_(0.0, 1.0).reshape(attention.shape)
    lo = frames.amin(dim=-1, keepdim=True)
    span = frames.amax(dim=-1, keepdim=True) - lo
    flat = span <= 1e-12
    out = torch.where(flat, torch.zeros_like(frames), (frames - lo) / span.masked_fill(flat, 1.0))
    return out.reshape(attention.shape)


def entity_map_from_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    text_range: tuple[int, int],
    video_range: tuple[int, int],
    entity_idx: Sequence[int],
    grid: tuple[int, int, int],
    scale: float | None = None,
    norm: str = "relative",
) -> torch.Tensor:
    """The ERAE map ``[B, T*h*w]`` (float32, in [0, 1]): :func:`entity_attention` normalised per frame
    by :func:`normalize_entity_map`."""
    return normalize_entity_map(entity_attention(q, k, text_range, video_range, entity_idx, grid, scale), grid, norm)


# CogVideoX's VAE: 4 video frames per latent frame after the first; 8 pixels per latent cell; the DiT
# patches 2x2 latent cells into one token.
VAE_TEMPORAL = 4
PIXELS_PER_TOKEN = 16


def video_frames_for(latent_frames: int) -> int:
    """Frames of the decoded video for ``latent_frames`` CogVideoX latent frames (``4k+1``)."""
    return VAE_TEMPORAL * (int(latent_frames) - 1) + 1


def mask_to_token_map(
    mask: torch.Tensor, grid: tuple[int, int, int], latent_frames: int | None = None
) -> torch.Tensor:
    """A user MASK (``[H, W]``, ``[1, H, W]`` or ``[F, H, W]``, values 0..1) → ``[T*h*w]``.

    The mask must have the video's aspect ratio (:func:`cvx_core.image_ops.same_aspect`, the rule the reference
    encoder applies to its mask): each frame is then area-resized to the token grid ``(h, w)``; another
    aspect ratio is an error, never a stretch. Frames: 1 → the same map on every token frame; ``T`` →
    one per token frame; one per video frame (``4·(L-1)+1`` for ``latent_frames`` L, the latent's frame
    count before the DiT's temporal patch; default ``T``, i.e. no temporal patch) → pixel frame 0 gives
    latent frame 0 and pixel frames ``4j-3 .. 4j`` latent frame ``j`` (the VAE's 4x temporal
    compression), latent frame ``j`` lands on token frame ``j·T // L`` (CogVideoX 1.5 patches two
    latent frames into one, after padding an odd count); frames landing on one token frame are averaged.
    [reconstructed] averaging over each compressed group of frames (DESIGN.md §1.3, "user MASK").
    """
    t, h, w = _check_grid(grid)
    latent = t if latent_frames is None else int(latent_frames)
    if not t <= latent <= 2 * t:
        raise ValueError(f"{latent} latent frames cannot make {t} token frames: expected T..2T")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ValueError(f"mask has shape {tuple(mask.shape)}: expected [H, W], [1, H, W] or [frames, H, W]")
    mh, mw = mask.shape[-2:]
    if not same_aspect((mh, mw), (h, w)):
        raise ValueError(
            f"the mask is {mw}x{mh} but the video is {w * PIXELS_PER_TOKEN}x{h * PIXELS_PER_TOKEN}: the aspect "
            "ratios differ, so the mask would be stretched; give a mask with the video's aspect ratio "
            "(e.g. drawn on a frame of this size)"
        )
    m = mask.detach().to(torch.float32).clamp(0.0, 1.0)
    if not has_subject(m):
        raise ValueError("the mask is empty: paint the subject's region, or use auto mode")
    small = F.adaptive_avg_pool2d(m.unsqueeze(1), (h, w)).squeeze(1)  # area resize, [F, h, w]
    n = small.shape[0]
    pixel_frames = video_frames_for(latent)
    if n == 1:
        out = small.expand(t, h, w)
    elif n == t:
        out = small
    elif n == pixel_frames:
        lat_idx = torch.tensor([0] + [(f - 1) // VAE_TEMPORAL + 1 for f in range(1, n)])
        tok_idx = (lat_idx * t // latent).to(small.device)
        out = torch.zeros(t, h, w, device=small.device).index_add_(0, tok_idx, small)
        out /= torch.bincount(tok_idx, minlength=t).clamp_min(1).view(t, 1, 1).to(out)
    else:
        raise ValueError(
            f"mask has {n} frames: expected 1 (same region on every frame), {t} (one per latent token "
            f"frame) or {pixel_frames} (one per video frame, 4k+1 for CogVideoX)"
        )
    return out.reshape(t * h * w).contiguous()


def refine_map(
    token_map: torch.Tensor,
    grid: tuple[int, int, int],
    mode: str = "soft",
    top_k: float = 0.25,
    smooth: int = 0,
) -> torch.Tensor:
    """Refine a ``[Sv]`` or ``[B, Sv]`` map per frame; same shape, float32.

    ``smooth`` (0 = off, else an odd kernel size in tokens) first applies a box filter per frame with
    replicated borders; then ``mode="soft"`` keeps the values and ``mode="top_k"`` sets the top
    ``top_k`` fraction of each frame's tokens to 1 and the rest to 0.
    [reconstructed] soft by default, as the paper avoids "restrictive spatial constraints"
    (DESIGN.md §1.3).
    """
    if mode not in REFINE_MODES:
        raise ValueError(f'refine mode "{mode}" is unknown (expected one of {", ".join(REFINE_MODES)})')
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k {top_k} is invalid: expected the fraction of tokens kept, in (0, 1]")
    if smooth < 0 or (smooth > 0 and smooth % 2 == 0):
        raise ValueError(f"smooth {smooth} is invalid: expected 0 (off) or an odd kernel size like 3 or 5")
    t, h, w = _check_grid(grid, token_map.shape[-1])
    x = token_map.to(torch.float32).reshape(-1, 1, h, w)
    if smooth > 1:
        pad = smooth // 2
        x = F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), smooth, stride=1)
    if mode == "top_k":
        flat = x.reshape(-1, h * w)
        keep = flat.topk(max(1, round(top_k * h * w)), dim=-1).indices
        x = torch.zeros_like(flat).scatter_(1, keep, 1.0)
    return x.reshape(token_map.shape)


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"ERAE strength λ = {lam} is invalid: expected a finite number >= 0 (0 = off)")
    return lam


@dataclass(frozen=True, eq=False)  # eq=False: a tensor field has no boolean equality
class EntityRegion:
    """ERAE settings: where the map comes from and how strongly it raises the reference bias.

    ``mode="auto"``: the map comes from the attention to ``entity_idx`` (text positions) in blocks
    ``map_block .. map_block + map_blocks - 1`` (averaged, then normalised by ``norm``) and is used by
    the later blocks of the same forward. ``mode="mask"``: ``mask`` gives the map. ``lam`` scales the
    extra bias ``λ · map`` on video → reference logits, from sampling progress ``start_percent`` on.
    [reconstructed] map from an early block (default :data:`MAP_BLOCK`) reused by later blocks; λ default
    1; start default :data:`ERAE_START` (DESIGN.md §1.3).
    """

    mode: str = "auto"
    entity_idx: tuple[int, ...] = ()
    mask: torch.Tensor | None = None
    lam: float = 1.0
    map_block: int = MAP_BLOCK
    refine: str = "soft"
    top_k: float = 0.25
    smooth: int = 0
    map_blocks: int = 1
    norm: str = "relative"
    start_percent: float = ERAE_START

    def __post_init__(self) -> None:
        if self.mode not in REGION_MODES:
            raise ValueError(
                f'region mode "{self.mode}" is unknown (expected one of {", ".join(REGION_MODES)})'
            )
        object.__setattr__(self, "entity_idx", tuple(int(i) for i in self.entity_idx))
        if self.mode == "auto" and not self.entity_idx:
            raise ValueError(
                "region mode auto needs the entity's token positions: name a word from the prompt"
            )
        if any(i < 0 for i in self.entity_idx):
            raise ValueError(
                f"entity_idx {self.entity_idx} has negative positions: expected text token indices"
            )
        if self.mode == "mask" and self.mask is None:
            raise ValueError("region mode mask needs a MASK: connect one, or use auto mode")
        object.__setattr__(self, "lam", _check_lam(self.lam))
        if int(self.map_block) != self.map_block or self.map_block < 0:
            raise ValueError(f"map_block {self.map_block} is invalid: expected a block index >= 0")
        if int(self.map_blocks) != self.map_blocks or self.map_blocks < 1:
            raise ValueError(f"map_blocks {self.map_blocks} is invalid: expected a block count >= 1")
        if self.norm not in MAP_NORMS:
            raise ValueError(f'map normalisation "{self.norm}" is unknown (expected one of {", ".join(MAP_NORMS)})')
        if not 0.0 <= self.start_percent <= 1.0:
            raise ValueError(f"start_percent {self.start_percent} is invalid: expected sampling progress in [0, 1]")
        if self.refine not in REFINE_MODES:
            raise ValueError(
                f'refine mode "{self.refine}" is unknown (expected one of {", ".join(REFINE_MODES)})'
            )
        if not 0.0 < self.top_k <= 1.0:
            raise ValueError(
                f"top_k {self.top_k} is invalid: expected the fraction of tokens kept, in (0, 1]"
            )
        if self.smooth < 0 or (self.smooth > 0 and self.smooth % 2 == 0):
            raise ValueError(f"smooth {self.smooth} is invalid: expected 0 (off) or an odd kernel size")

    @property
    def last_map_block(self) -> int:
        """The last block whose attention goes into the auto map; later blocks use it."""
        return self.map_block + self.map_blocks - 1

    def refined(self, token_map: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """:func:`refine_map` with this region's settings."""
        return refine_map(token_map, grid, self.refine, self.top_k, self.smooth)

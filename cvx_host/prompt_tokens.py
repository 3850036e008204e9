"""The prompt's token ids and a tokenizer to match words against them, from any host CLIP with a T5-family
text encoder: CogVideoX's T5 (``CLIPLoader`` type cogvideox, tokens under ``t5xxl``) and Wan's umT5 (type
wan, tokens under ``umt5xxl``, a SentencePiece tokenizer whose model comes inside the text encoder file).

The host's outer tokenizer (``comfy.sd1_clip.SD1Tokenizer`` and its relatives) returns a dict of token
lists keyed by encoder and keeps each encoder's tokenizer as an attribute (``clip_<key>`` or ``<key>``);
that tokenizer holds the actual one as ``.tokenizer``: a Hugging Face tokenizer, or the host's
``SPieceTokenizer``, which :class:`SentencePieceView` gives the few Hugging Face calls entity matching uses.
"""

from __future__ import annotations

from typing import Any

from ..cvx_core.entity_region import ids_from_token_weights

# Token keys of T5-family encoders, in the order they are chosen when a CLIP holds several encoders.
T5_KEYS = ("t5xxl", "umt5xxl")


class SentencePieceView:
    """``tokenizer(text)["input_ids"]``, ``convert_ids_to_tokens`` and ``all_special_ids`` over the host's
    ``SPieceTokenizer`` (its ``.tokenizer`` is a ``sentencepiece.SentencePieceProcessor``)."""

    def __init__(self, spiece: Any):
        self._spiece = spiece
        sp = spiece.tokenizer
        self.all_special_ids = sorted({i for i in (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) if i >= 0})

    def __call__(self, text: str) -> dict[str, list[int]]:
        return self._spiece(text)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._spiece.tokenizer.id_to_piece(int(i)) for i in ids]


def _tokens_key(keys: list[str], node: str) -> str:
    if len(keys) == 1:
        return keys[0]
    for key in T5_KEYS:
        if key in keys:
            return key
    raise ValueError(f"{node}: this CLIP tokenizes for {keys}, none of them a T5 text encoder ({list(T5_KEYS)}); "
                     f"load the model's T5/umT5 text encoder with CLIPLoader (type cogvideox or wan)")


def _inner_tokenizer(clip: Any, key: str) -> Any:
    outer = getattr(clip, "tokenizer", None)
    names = [f"clip_{key}", key]
    if getattr(outer, "clip_name", None) == key and isinstance(getattr(outer, "clip", None), str):
        names.insert(0, outer.clip)
    for name in names:
        inner = getattr(outer, name, None)
        if inner is not None:
            return getattr(inner, "tokenizer", None)
    return None


def prompt_tokens(clip: Any, prompt: str, node: str) -> tuple[list[int], Any]:
    """``(token ids of prompt as the text encoder sees them, a Hugging Face-style tokenizer for them)``."""
    tokens = clip.tokenize(prompt)
    key = _tokens_key(list(tokens), node)
    tok = _inner_tokenizer(clip, key)
    if tok is not None and not hasattr(tok, "convert_ids_to_tokens") and hasattr(getattr(tok, "tokenizer", None),
                                                                                   "id_to_piece"):
        tok = SentencePieceView(tok)
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        raise ValueError(f"{node}: this CLIP's {key!r} tokenizer ({type(tok).__name__}) cannot be read for word "
                         f"positions; load the T5/umT5 text encoder with CLIPLoader (type cogvideox or wan)")
    return ids_from_token_weights(tokens[key][0]), tok

"""ERAE auto mode's prompt tokens from the host's Wan umT5 CLIP (CLIPLoader type wan) and CogVideoX T5 CLIP.

The Wan CLIP is the host's real ``CLIP`` with its real ``WanT5Tokenizer`` (tokens keyed ``umt5xxl``, a
SentencePiece tokenizer, padded with 0 to 512 tokens). The umT5 SentencePiece model ships inside the text
encoder file, not in the host tree, so it holds the host tree's T5 SentencePiece model (see
``CVXTestWanTokenizerClip``). Expected positions come from ``sentencepiece`` directly.
"""

from __future__ import annotations

import pytest
import sentencepiece
from test_nodes_testonly import wan_tokenizer_clip

pytestmark = pytest.mark.host
NODE = "CustomVideoXEntityRegion"
PROMPT = 'A corgi dog runs along a sunny beach, a "dog" toy in a hotdog stand. Corgi-dog!'


@pytest.fixture(scope="module")
def clip():
    return wan_tokenizer_clip()


def pieces_of(clip, text: str) -> list[str]:
    sp: sentencepiece.SentencePieceProcessor = clip.tokenizer.clip_umt5xxl.tokenizer.tokenizer
    return sp.encode(text, out_type=str)


def test_wan_clip_tokens_and_entity_positions(host, clip):
    from customvideox.cvx_core import entity_region as er
    from customvideox.cvx_host import prompt_tokens as pt
    ids, tok = pt.prompt_tokens(clip, PROMPT, NODE)
    assert len(ids) == 512 and set(ids[len(pieces_of(clip, PROMPT)) + 1:]) == {0}  # EOS, then padding 0
    pos = er.entity_tokens_with_tokenizer(ids, ["corgi", "dog"], tok, prompt=PROMPT)
    pieces = pieces_of(clip, PROMPT)  # the host tokenizes word by word: the same pieces here
    assert tok.convert_ids_to_tokens(ids[:len(pieces)]) == pieces
    assert pieces[:5] == ["▁A", "▁c", "org", "i", "▁dog"]
    assert pieces[13:15] == ['▁"', "dog"] and pieces[20:22] == ["▁hot", "dog"]
    assert pieces[24:29] == ["▁C", "org", "i", "-", "dog"]
    # corgi, dog, "dog", Corgi (capitalised), -dog; not the "dog" of hotdog (21), nor EOS or padding.
    assert pos == [1, 2, 3, 4, 14, 24, 25, 26, 28]


def test_entity_region_node_auto_mode_with_the_wan_clip(host, clip):
    node = host.node_classes[NODE]
    region = node.execute(mode="auto", lam=1.0, map_block=0, refine="soft", top_k=0.25, smooth=0, prompt=PROMPT,
                          subject_words="sunny beach", clip=clip).result[0]
    pieces = pieces_of(clip, PROMPT)
    assert [pieces[p] for p in region.entity_idx] == ["▁sun", "ny", "▁beach"]
    with pytest.raises(ValueError, match=f'{NODE} subject_words: entity word "cat" is not in the prompt'):
        node.execute(mode="auto", lam=1.0, map_block=0, refine="soft", top_k=0.25, smooth=0, prompt=PROMPT,
                     subject_words="cat", clip=clip)


def test_cogvideox_clip_still_reads_t5xxl(host):
    import comfy.sd
    import comfy.text_encoders.cogvideo
    from customvideox.cvx_host import prompt_tokens as pt
    clip = comfy.sd.CLIP.__new__(comfy.sd.CLIP)
    clip.tokenizer = comfy.text_encoders.cogvideo.CogVideoXTokenizer()
    clip.tokenizer_options = {}
    from customvideox.cvx_core import entity_region as er
    ids, tok = pt.prompt_tokens(clip, "a corgi dog", NODE)
    pos = er.entity_tokens_with_tokenizer(ids, ["dog"], tok)
    assert len(ids) == 226 and tok.convert_ids_to_tokens([ids[p] for p in pos]) == ["▁dog"]


def test_clip_without_a_t5_tokenizer_is_a_clear_error(host):
    from customvideox.cvx_host import prompt_tokens as pt
    class TwoClips:
        tokenizer = None

        def tokenize(self, text):
            return {"l": [[(1, 1.0)]], "g": [[(1, 1.0)]]}

    with pytest.raises(ValueError, match=rf"{NODE}: this CLIP tokenizes for \['l', 'g'\], none of them a T5"):
        pt.prompt_tokens(TwoClips(), "a dog", NODE)

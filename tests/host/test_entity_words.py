"""ERAE subject words with the host's real T5 tokenizer (the tokenizer files ship with the host)."""

from __future__ import annotations

import pytest
from customvideox.cvx_core.entity_region import (
    entity_tokens_with_tokenizer,
    ids_from_token_weights,
)


@pytest.fixture(scope="module")
def host_t5():
    from comfy.text_encoders.cogvideo import CogVideoXTokenizer

    wrapper = CogVideoXTokenizer()
    return wrapper, getattr(wrapper, wrapper.clip).tokenizer


@pytest.mark.host
def test_real_t5_corgi_dog(host_t5):
    wrapper, tok = host_t5
    prompt = "a photo of a corgi dog running on the beach"
    ids = host_prompt_ids(wrapper, prompt)
    pos = entity_tokens_with_tokenizer(ids, ["corgi", "dog"], tok, prompt=prompt)
    pieces = tok.convert_ids_to_tokens([ids[p] for p in pos])
    assert "".join(pieces).replace("▁", " ").split() == ["corgi", "dog"]
    assert pieces[0] == "▁cor" and pieces[-1] == "▁dog" and len(pos) == len(set(pos)) == 4
    assert pos == list(range(pos[0], pos[0] + 4))  # contiguous, and no EOS/padding position
    assert all(ids[p] not in tok.all_special_ids for p in pos)


@pytest.mark.host
def test_real_t5_word_after_punctuation_and_capitalised(host_t5):
    wrapper, tok = host_t5
    prompt = 'a corgi-dog, a "dog" next to a hotdog. Dog\'s ball'
    ids = host_prompt_ids(wrapper, prompt)
    pos = entity_tokens_with_tokenizer(ids, ["dog"], tok, prompt=prompt)
    pieces = tok.convert_ids_to_tokens([ids[p] for p in pos])
    before = tok.convert_ids_to_tokens([ids[p - 1] for p in pos])
    assert pieces == ["dog", "dog", "▁Dog"], pieces  # after "-", after '▁"', capitalised
    assert before[:2] == ["-", '▁"']
    hot = tok.convert_ids_to_tokens(ids).index("▁hot")
    assert hot + 1 not in pos  # the "dog" piece inside "hotdog" is not the word


@pytest.mark.host
def test_real_t5_word_not_in_prompt(host_t5):
    wrapper, tok = host_t5
    prompt = "a photo of a corgi dog running on the beach"
    with pytest.raises(ValueError, match=r'"cat" is not in the prompt "a photo of a corgi.*mask'):
        entity_tokens_with_tokenizer(host_prompt_ids(wrapper, prompt), ["cat"], tok, prompt=prompt)


@pytest.mark.host
@pytest.mark.parametrize("prompt,word", [
    ("一只柯基在海滩上奔跑", "柯基"),  # T5's vocabulary has no CJK: the whole prompt is "▁ <unk>"
    ("a 🐶 runs on the beach", "🐶"),  # the emoji is "▁ <unk>"; "▁" also precedes "a"
    ('a "柯基" dog on the beach', "柯基"),  # after punctuation
])
def test_real_t5_word_it_cannot_spell_is_an_error_suggesting_mask_mode(host_t5, prompt, word):
    wrapper, tok = host_t5
    ids = host_prompt_ids(wrapper, prompt)
    assert tok.unk_token_id in ids  # the premise: the word is unknown to T5
    with pytest.raises(ValueError) as info:
        entity_tokens_with_tokenizer(ids, [word], tok, prompt=prompt)
    msg = str(info.value)
    assert f'"{word}" cannot be spelled' in msg and "mask" in msg


@pytest.mark.host
def test_real_t5_matches_real_pieces_only(host_t5):
    wrapper, tok = host_t5
    # accented Latin T5 knows: one piece, both occurrences
    assert entity_pieces(wrapper, tok, "a café in Paris, the café is red", ["café"])[1] == ["▁café", "▁café"]
    # a word that occurs twice: every piece of both
    pos, pieces = entity_pieces(wrapper, tok, "a corgi and another corgi", ["corgi"])
    assert pieces == ["▁cor", "g", "i"] * 2 and len(set(pos)) == 6
    # a multi-word subject (one entry), capitalised, matched as a whole at both places
    pos, pieces = entity_pieces(wrapper, tok, "a corgi dog runs; the corgi dog barks, a dog sleeps", ["Corgi Dog"])
    assert pieces == ["▁cor", "g", "i", "▁dog"] * 2
    # a word with an unknown letter: its known pieces only, never the <unk>
    assert entity_pieces(wrapper, tok, "Zoë runs on the beach", ["Zoë"])[1] == ["▁Zo"]
    # a known word in a prompt T5 mostly cannot spell: its pieces, no bare "▁" or <unk> around it
    assert entity_pieces(wrapper, tok, "一只 corgi 在海滩上", ["corgi"])[1] == ["▁cor", "g", "i"]
    # a word whose form starts with a bare "▁" piece ("▁ läuft"): the piece after it
    assert entity_pieces(wrapper, tok, "Zoë läuft am Strand", ["läuft"])[1] == ["läuft"]


def host_prompt_ids(wrapper, text):
    pairs = wrapper.tokenize_with_weights(text)["t5xxl"]
    assert len(pairs) == 1 and len(pairs[0]) == 226  # CogVideoX pads T5 to 226 tokens
    return ids_from_token_weights(pairs[0])


def entity_pieces(wrapper, tok, prompt, words):
    ids = host_prompt_ids(wrapper, prompt)
    pos = entity_tokens_with_tokenizer(ids, words, tok, prompt=prompt)
    return pos, tok.convert_ids_to_tokens([ids[p] for p in pos])

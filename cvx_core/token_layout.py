"""Where text, reference and video tokens sit in the DiT's joint attention sequence.

The host's CogVideoX block attends over ``[text | image tokens]``. The reference patch adds
reference tokens in front of the video tokens: in two-way mode they are part of the image
sequence (reference latent frames prepended on T), so queries and keys both hold them; in
one-way mode only the keys hold them (cached K/V inserted after the text).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLayout:
    """Token counts of one attention call, in sequence order ``[text | ref_0 .. ref_n | video]``.

    ``refs_in_queries`` is True in two-way mode (reference tokens are also queries) and
    False in one-way mode (reference keys/values come from a cache, queries are
    ``[text | video]``). ``grid`` is the video's ``(frames, h, w)`` in tokens.
    """

    text: int
    refs: tuple[int, ...]
    grid: tuple[int, int, int]
    refs_in_queries: bool = True

    @property
    def video(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def ref_total(self) -> int:
        return sum(self.refs)

    @property
    def keys(self) -> int:
        return self.text + self.ref_total + self.video

    @property
    def queries(self) -> int:
        return self.keys if self.refs_in_queries else self.text + self.video

    def ref_key_span(self, i: int) -> tuple[int, int]:
        start = self.text + sum(self.refs[:i])
        return start, start + self.refs[i]

    @property
    def video_key_start(self) -> int:
        return self.text + self.ref_total

    @property
    def video_query_start(self) -> int:
        return self.text + (self.ref_total if self.refs_in_queries else 0)

"""The text stream's special tokens, which every Kyutai text tokenizer and LM share. Torch-free.

The tokenizers number 0 <unk>, 1 <s>, 2 </s>, 3 <pad>; the LM writes 3 in a frame with no text
and 0 in the frame before a word starts ("end of padding"). No id up to 3 is ever text.
"""

from __future__ import annotations

from typing import Protocol

TEXT_EPAD = 0  # end of padding: a word starts at the next text token
TEXT_PAD = 3  # padding: no text this frame


class Tokenizer(Protocol):  # sentencepiece.SentencePieceProcessor
    def decode(self, ids: list[int]) -> str: ...
    def encode(self, text: str) -> list[int]: ...
    def id_to_piece(self, id: int) -> str: ...
    def eos_id(self) -> int: ...


def text_piece(tokenizer: Tokenizer, token: int) -> str | None:
    """The text of a token as the reference prints it ("▁" as a space), or None for a special
    token (padding, <unk>, <s>, </s>): those are never shown to a person."""
    if token <= TEXT_PAD:
        return None
    return tokenizer.id_to_piece(token).replace("▁", " ")

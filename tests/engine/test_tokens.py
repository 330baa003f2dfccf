"""The text of the text stream's tokens: what a person may read."""

from engine.moshi.tokens import text_piece


class Pieces:
    """A tokenizer with the special pieces every Kyutai tokenizer numbers 0 to 3."""

    pieces = ["<unk>", "<s>", "</s>", "<pad>", "▁Hello", ",", "▁world"]

    def id_to_piece(self, id: int) -> str:
        return self.pieces[id]


def test_words_read_with_their_spaces():
    assert [text_piece(Pieces(), t) for t in (4, 5, 6)] == [" Hello", ",", " world"]


def test_special_tokens_have_no_text():
    assert [text_piece(Pieces(), t) for t in range(4)] == [None, None, None, None]

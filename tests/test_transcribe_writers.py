"""The transcript writers: one class per format, named by its file extension, in the registry that
gives `moshi transcribe -f` its choices."""

import io

from typer.testing import CliRunner

from moshi_tui.cli import app
from moshi_tui.transcript_writers import ALL, WRITERS, CueLimits, writers_for


def test_the_registry_gives_the_cli_its_choices():
    choices = [*WRITERS, ALL]
    assert choices == ["txt", "srt", "vtt", "json", "jsonl", "all"]
    assert all(writer.extension == name for name, writer in WRITERS.items())
    assert writers_for(ALL) == list(WRITERS.values()) and writers_for("srt") == [WRITERS["srt"]]
    help_text = CliRunner().invoke(app, ["transcribe", "--help"]).output
    assert f"-f, --output-format <{'|'.join(choices)}>" in help_text
    refused = CliRunner().invoke(app, ["transcribe", "-f", "tsv", "talk.wav"])
    assert refused.exit_code == 2 and "'tsv' is not one of " + ", ".join(map(repr, choices)) in refused.output


def test_every_writer_opens_on_stdout(tmp_path):
    for name, writer in WRITERS.items():
        out = io.StringIO()
        listener = writer.open(None, out, {"source": "talk.wav"}, CueLimits())
        listener.on_end(True, 0.0)
        assert not out.closed, name  # stdout is not the writer's to close


class Pieces:
    """A tokenizer: 0 end of padding, 2 </s>, 3 padding, then three words."""

    pieces = ["<unk>", "<s>", "</s>", "<pad>", "▁so", "▁this", "▁works"]

    def id_to_piece(self, id):
        return self.pieces[id]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").strip()

    def encode(self, text):
        return [self.pieces.index("▁" + word) for word in text.split()]

    def eos_id(self):
        return 2


def _outputs(tmp_path, tokens):
    from engine.stt.words import Listeners, WordAssembler
    from moshi_tui.transcript_writers import JsonWriter, UntimedWarning, WordPrinter

    out, err = io.StringIO(), io.StringIO()
    doc = JsonWriter(tmp_path / "talk.json", {"source": "talk.wav"})
    txt = WRITERS["txt"].open(tmp_path / "talk.txt", out, {}, CueLimits())
    words = WordAssembler(Pieces(), 0.0, Listeners([doc, txt, WordPrinter(out), UntimedWarning(err, "talk.wav")]))
    for token in tokens:
        words.push(token)
    words.finish(duration=len(tokens) * 0.08)
    return out.getvalue(), (tmp_path / "talk.txt").read_text(), doc.document["words"], err.getvalue()


def test_stdout_and_files_hold_the_same_words(tmp_path):
    stdout, txt, words, warning = _outputs(tmp_path, [3, 0, 4, 3, 0, 5, 0, 6, 3, 3])
    assert stdout == "so this works\n" and txt.strip() == "so this works"
    assert [w["text"] for w in words] == ["so", "this", "works"] and warning == ""


def test_text_that_cannot_be_timed_is_said_so(tmp_path):
    stdout, txt, words, warning = _outputs(tmp_path, [3, 4, 3, 5, 6, 2, 3])  # no end of padding, ever
    assert stdout == "\n" and txt == "" and words == []
    assert warning.startswith("moshi: warning: talk.wav: the model wrote 3 text pieces but never marked")
    assert "no word could be timed" in warning and warning.count("\n") == 1

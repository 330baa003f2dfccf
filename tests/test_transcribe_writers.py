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

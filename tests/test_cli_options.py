"""Options that cannot go together are refused, in one line, before anything loads."""

import subprocess
import sys


def _moshi(*args):
    return subprocess.run([sys.executable, "-m", "moshi_tui", *args], capture_output=True, text=True, timeout=60)


def test_a_voice_with_a_model_folder_is_refused(tmp_path):
    result = _moshi("chat", "--voice", "moshiko", "--hf-repo", str(tmp_path), "--no-tui")
    assert result.returncode == 2
    assert "--hf-repo names the model, and with it the voice" in result.stderr


def test_every_placeholder_is_an_upper_case_name_or_a_list_of_choices():
    import re

    import typer.main

    from moshi_tui.cli import app
    from moshi_tui.commands.common import help_record

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        ctx = command.context_class(command, info_name=name)
        usage = " ".join(command.collect_usage_pieces(ctx))
        assert not re.search(r"[{}]|\[[a-z]", usage), (name, usage)
        for param in command.get_params(ctx):
            record = help_record(param, ctx)
            if record is None or getattr(param, "is_flag", False):
                continue
            placeholder = record[0].split(" ")[-1] if param.param_type_name == "option" else record[0]
            if not placeholder.startswith("-"):
                assert re.fullmatch(r"[A-Z_]+(\.\.\.)?|<[a-z0-9.|-]+>", placeholder), (name, record[0])

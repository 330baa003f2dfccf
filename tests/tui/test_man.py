"""The checked-in man pages: current with the CLI, every command and option in them, clean roff."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import typer.main

from moshi_tui.cli import app
from moshi_tui.commands.common import help_record

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "man"


def roff(text: str) -> str:
    return text.replace("-", "\\-")


def _make_man():
    spec = importlib.util.spec_from_file_location("make_man", REPO / "scripts" / "make_man.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_command_and_option_is_in_its_page():
    group = typer.main.get_command(app)
    root_page = (MAN / "moshi.1").read_text()
    for param in group.params:
        for opt in param.opts + param.secondary_opts:
            assert roff(opt) in root_page, f"moshi.1 lacks {opt}"
    for name, command in group.commands.items():
        page = MAN / f"moshi-{name}.1"
        assert page.is_file(), f"no man page for `moshi {name}`"
        assert roff(f"moshi-{name}") in root_page, f"moshi.1 does not list `moshi {name}`"
        text = page.read_text()
        ctx = command.context_class(command, info_name=name)
        for param in command.params:
            if param.param_type_name == "argument":
                shown = help_record(param, ctx)[0]  # as `moshi NAME --help` shows it
                assert f"\\fI{shown}\\fR" in text, f"{page.name} lacks the argument {shown}"
            else:
                for opt in param.opts + param.secondary_opts:
                    assert f"\\fB{roff(opt)}\\fR" in text, f"{page.name} lacks {opt}"


def test_the_pages_are_what_the_script_writes_now():
    pages = _make_man().render_pages()
    assert sorted(pages) == sorted(p.name for p in MAN.glob("*.1"))
    for name, text in pages.items():
        assert (MAN / name).read_text() == text, f"man/{name} is stale: run python scripts/make_man.py"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_groff_has_nothing_to_say():
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", *sorted(map(str, MAN.glob("*.1")))],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_package_installs_every_page_into_man1():
    import tomllib

    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    installed = {path.name for pattern in data_files["share/man/man1"] for path in REPO.glob(pattern)}
    assert installed == {p.name for p in MAN.glob("*.1")} and "moshi.1" in installed

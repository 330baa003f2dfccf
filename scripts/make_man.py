"""Write the man pages (man/moshi.1 and man/moshi-COMMAND.1) from the Typer app.

    python scripts/make_man.py            # rewrite man/
    python scripts/make_man.py --check    # exit 1 if man/ is not what the app says

Everything comes from the command tree: help text, usage, options with their metavars and
defaults, epilogs (as EXAMPLES). The pages carry no date, so the output only changes with the CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import typer.main

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moshi_tui import __version__  # noqa: E402
from moshi_tui.cli import app  # noqa: E402
from moshi_tui.commands.common import help_record  # noqa: E402

SETTINGS = """\
Every option of every command can also be set in the config file or the environment. The first of
these that is set wins: the flag; the variable MOSHI_<OPTION> (dashes become underscores, so
--input-device is MOSHI_INPUT_DEVICE); the command's table in the config file; a top-level key of
the config file; the built-in default."""

ENVIRONMENT = (
    ("MOSHI_<OPTION>", "Default for the option of that name, for every command that has it."),
    ("MOSHI_CONFIG", "Path of the config file to read instead of the default one."),
    ("MOSHI_DEBUG", "Set to 1 to see the full traceback of an error instead of its one-line message."),
    ("MOSHI_NO_PIPELINE", "Set to 1 to run Mimi in the same process as the language model when transcribing or "
                          "chatting live on a CPU (by default it gets a process, and a core, of its own)."),
    ("MOSHI_NO_COMPILE, MOSHI_NO_CUDA_GRAPH", "Set to 1 to run the model's step on a GPU without "
                                              "torch.compile, or without capturing it in a CUDA graph."),
    ("XDG_CONFIG_HOME", "Base folder of the config file (default ~/.config)."),
    ("XDG_DATA_HOME", "Base folder of recorded conversations (default ~/.local/share)."),
    ("NO_COLOR", "Set to anything to draw the terminal interface without colours."),
    ("HF_HOME, HF_HUB_OFFLINE", "Hugging Face cache location, and offline use of the cached models."),
)

CONFIG_EXAMPLE = """\
# ~/.config/moshi/config.toml
device = "cuda"          # every command with --device

[chat]
voice = "moshiko"
"""


def esc(text: str) -> str:
    """Plain text for roff: backslashes, and control characters at line starts."""
    lines = text.replace("\\", "\\e").split("\n")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in lines)


def code(text: str) -> str:
    """Commands and options: also real minus signs, so they can be copied into a shell."""
    return esc(text).replace("-", "\\-")


def term(text: str) -> str:
    """`-i, --input AUDIO` as bold options and an italic metavar."""
    words = []
    for word in text.split(" "):
        comma = "," if word.endswith(",") else ""
        word = word.rstrip(",")
        if word.startswith("-"):
            words.append(f"\\fB{code(word)}\\fR{comma}")
        elif word == "/":
            words.append(word)
        else:
            words.append(f"\\fI{code(word)}\\fR{comma}")
    return " ".join(words)


def paragraphs(text: str) -> list[str]:
    """Click help text as roff: blank lines part paragraphs, a `\\b` paragraph keeps its lines."""
    out = []
    for block in text.strip("\n").split("\n\n"):
        if block.startswith("\b\n"):
            out.append(".nf\n" + code(block[2:].rstrip("\n")) + "\n.fi")
        else:
            out.append(esc(" ".join(line.strip() for line in block.splitlines())))
    return out


def _header(title: str, name: str, summary: str) -> list[str]:
    return [
        f'.TH {code(title.upper())} 1 "" "moshi {__version__}" "User Commands"',
        ".SH NAME",
        f"{code(name)} \\- {esc(summary)}",
    ]


def _section(title: str, blocks: list[str]) -> list[str]:
    lines = [f".SH {title}"]
    for i, block in enumerate(blocks):
        if i:
            lines.append(".PP")
        lines.append(block)
    return lines


def _options(command, ctx) -> list[str]:
    lines = [".SH OPTIONS"]
    for param in command.get_params(ctx):
        record = help_record(param, ctx)
        if record is None:
            continue
        lines += [".TP", term(record[0]), esc(record[1] or "")]
    return lines


def _summary(command) -> str:
    if command.short_help:
        return command.short_help.rstrip(".")
    return (command.help or "").split("\n\n")[0].split(". ")[0].rstrip(".")


def _examples(command) -> list[str]:
    epilog = command.epilog or ""
    if not epilog:
        return []
    title, _, rest = epilog.partition("\n")
    if title.strip().rstrip(":").lower() == "examples":
        return _section("EXAMPLES", paragraphs(rest))
    return _section("NOTES", paragraphs(epilog))


def render_pages() -> dict[str, str]:
    """File name -> page text."""
    group = typer.main.get_command(app)
    root = typer.main.get_command(app).context_class(group, info_name="moshi")
    pages = {}
    names = sorted(group.commands)

    lines = _header("moshi", "moshi", _summary(group))
    lines += [".SH SYNOPSIS", ".B moshi", esc(" ".join(group.collect_usage_pieces(root)))]
    lines += _section("DESCRIPTION", paragraphs(group.help or ""))
    lines += _options(group, root)
    lines.append(".SH COMMANDS")
    for name in names:
        command = group.commands[name]
        see = f"See \\fB{code('moshi-' + name)}\\fR(1)."
        lines += [".TP", f"\\fB{code('moshi ' + name)}\\fR", f"{esc(_summary(command))}. {see}"]
    lines += _section("SETTINGS", paragraphs(SETTINGS) + [".nf\n" + esc(CONFIG_EXAMPLE.rstrip("\n")) + "\n.fi"])
    lines.append(".SH ENVIRONMENT")
    for var, what in ENVIRONMENT:
        lines += [".TP", f"\\fB{code(var)}\\fR", esc(what)]
    lines += [".SH FILES", ".TP", "\\fI~/.config/moshi/config.toml\\fR",
              "The config file (see SETTINGS).", ".TP", "\\fI~/.local/share/moshi/\\fR",
              "Recorded conversations: audio, transcripts and event logs."]
    lines += [".SH SEE ALSO", ", ".join(f"\\fB{code('moshi-' + n)}\\fR(1)" for n in names)]
    pages["moshi.1"] = "\n".join(lines) + "\n"

    for name in names:
        command = group.commands[name]
        ctx = command.context_class(command, info_name=name, parent=root)
        lines = _header(f"moshi-{name}", f"moshi-{name}", _summary(command))
        lines += [".SH SYNOPSIS", f".B {code('moshi ' + name)}", esc(" ".join(command.collect_usage_pieces(ctx)))]
        lines += _section("DESCRIPTION", paragraphs(command.help or _summary(command)))
        lines += _options(command, ctx)
        lines += _examples(command)
        lines += [".SH SEE ALSO", "\\fBmoshi\\fR(1)"]
        pages[f"moshi-{name}.1"] = "\n".join(lines) + "\n"
    return pages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "man", help="folder of the pages (default: man/)")
    parser.add_argument("--check", action="store_true", help="only check that the pages are up to date")
    args = parser.parse_args()
    pages = render_pages()
    existing = {p.name for p in args.out.glob("moshi*.1")} if args.out.is_dir() else set()
    if args.check:
        stale = sorted(n for n, text in pages.items()
                       if not (args.out / n).is_file() or (args.out / n).read_text() != text)
        stale += sorted(existing - set(pages))
        if stale:
            print(f"man pages out of date: {', '.join(stale)}; run python scripts/make_man.py", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in existing - set(pages):
        (args.out / name).unlink()  # a command that no longer exists
    for name, text in pages.items():
        (args.out / name).write_text(text)
    print(f"wrote {len(pages)} pages to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

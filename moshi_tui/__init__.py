"""The moshi terminal app: CLI, Textual TUI and the wiring between audio layer and engine."""

__version__ = "0.1.0"

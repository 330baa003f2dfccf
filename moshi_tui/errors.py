"""Errors in what the user asked for, found before anything loads."""


class ArgumentError(Exception):
    """A bad argument or setting: one line on stderr, exit status 2 (`cli.main`)."""

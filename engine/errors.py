"""Errors a user can cause and fix. The CLI prints them on one line, without a traceback."""


class EngineError(Exception):
    """Base class for engine failures with a message meant for the user."""


class CheckpointError(EngineError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""

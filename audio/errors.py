"""Errors a user can cause and fix (devices, files). The CLI prints them on one line."""


class AudioError(Exception):
    """Base class for audio failures with a message meant for the user."""

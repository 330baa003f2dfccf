"""Errors a user can cause and fix (devices, files). The CLI prints them on one line."""


class AudioError(Exception):
    """Base class for audio failures with a message meant for the user."""


class AudioFileError(AudioError):
    """An audio file is missing, empty or cannot be decoded."""


class DeviceError(AudioError):
    """No usable sound device: none found, busy, gone mid-conversation, or a bad choice."""


class EchoCancellerError(AudioError):
    """The speex library behind echo cancellation cannot be loaded."""

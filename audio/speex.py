"""ctypes binding to Debian's libspeexdsp: the MDF echo canceller and the preprocessor.

The PyPI ``speexdsp`` binding cannot reach the preprocessor (noise and residual-echo suppression)
and reads past short buffers, so we bind the C library directly and check every length.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

from .errors import EchoCancellerError

_ECHO_SET_SAMPLING_RATE = 24
_ECHO_GET_IMPULSE_RESPONSE_SIZE = 27
_ECHO_GET_IMPULSE_RESPONSE = 29
_PP_SET_DENOISE = 0
_PP_SET_NOISE_SUPPRESS = 18
_PP_SET_ECHO_SUPPRESS = 20
_PP_SET_ECHO_SUPPRESS_ACTIVE = 22
_PP_SET_ECHO_STATE = 24

_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The loaded libspeexdsp, or an EchoCancellerError that says how to get it."""
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("speexdsp") or "libspeexdsp.so.1")
        except OSError as exc:
            raise EchoCancellerError(
                "echo cancellation needs libspeexdsp (Debian/Ubuntu: apt install libspeexdsp1); "
                "use --no-aec to run without it (with headphones)"
            ) from exc
        p, i16 = ctypes.c_void_p, np.ctypeslib.ndpointer(np.int16, flags="C_CONTIGUOUS")
        lib.speex_echo_state_init.argtypes, lib.speex_echo_state_init.restype = [ctypes.c_int, ctypes.c_int], p
        lib.speex_echo_state_destroy.argtypes = [p]
        lib.speex_echo_state_reset.argtypes = [p]
        lib.speex_echo_ctl.argtypes = [p, ctypes.c_int, p]
        lib.speex_echo_cancellation.argtypes = [p, i16, i16, i16]
        lib.speex_preprocess_state_init.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.speex_preprocess_state_init.restype = p
        lib.speex_preprocess_state_destroy.argtypes = [p]
        lib.speex_preprocess_ctl.argtypes = [p, ctypes.c_int, p]
        lib.speex_preprocess_run.argtypes = [p, i16]
        _lib = lib
    return _lib


def _ctl_int(fn, state, request: int, value: int) -> None:
    v = ctypes.c_int(value)
    fn(state, request, ctypes.byref(v))


class SpeexEcho:
    """Speex MDF adaptive filter: ``cancel(near, far)`` on int16 frames of exactly ``frame_size``."""

    def __init__(self, frame_size: int, filter_length: int, sample_rate: int):
        self._lib = library()
        self.frame_size, self.filter_length = frame_size, filter_length
        self._state = self._lib.speex_echo_state_init(frame_size, filter_length)
        _ctl_int(self._lib.speex_echo_ctl, self._state, _ECHO_SET_SAMPLING_RATE, sample_rate)
        self._out = np.zeros(frame_size, np.int16)

    def cancel(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        if near.shape != (self.frame_size,) or far.shape != (self.frame_size,):
            raise ValueError(f"speex frames must hold {self.frame_size} samples, got {near.shape} and {far.shape}")
        self._lib.speex_echo_cancellation(self._state, near, far, self._out)
        return self._out.copy()

    def impulse_response(self) -> np.ndarray:
        """The filter's current estimate of the echo path (float, arbitrary scale)."""
        size = ctypes.c_int(0)
        self._lib.speex_echo_ctl(self._state, _ECHO_GET_IMPULSE_RESPONSE_SIZE, ctypes.byref(size))
        buf = np.zeros(size.value, np.int32)
        self._lib.speex_echo_ctl(self._state, _ECHO_GET_IMPULSE_RESPONSE, buf.ctypes.data)
        return buf.astype(np.float32)

    def reset(self) -> None:
        self._lib.speex_echo_state_reset(self._state)

    def __del__(self):
        if getattr(self, "_state", None):
            self._lib.speex_echo_state_destroy(self._state)
            self._state = None


class SpeexPreprocessor:
    """Speex preprocessor tied to an echo canceller: residual-echo suppression (+ denoise, which
    the suppressor needs to act at all). ``run`` works in place on int16 frames."""

    def __init__(self, frame_size: int, sample_rate: int, echo: SpeexEcho | None, denoise: bool = True,
                 noise_suppress_db: int = -15, echo_suppress_db: int = -40, echo_suppress_active_db: int = -15):
        self._lib = library()
        self.frame_size = frame_size
        self._echo = echo  # keeps the echo state alive as long as we point at it
        self._state = self._lib.speex_preprocess_state_init(frame_size, sample_rate)
        ctl = self._lib.speex_preprocess_ctl
        _ctl_int(ctl, self._state, _PP_SET_DENOISE, int(denoise))
        _ctl_int(ctl, self._state, _PP_SET_NOISE_SUPPRESS, noise_suppress_db)
        if echo is not None:
            ctl(self._state, _PP_SET_ECHO_STATE, echo._state)
            _ctl_int(ctl, self._state, _PP_SET_ECHO_SUPPRESS, echo_suppress_db)
            _ctl_int(ctl, self._state, _PP_SET_ECHO_SUPPRESS_ACTIVE, echo_suppress_active_db)

    def run(self, frame: np.ndarray) -> np.ndarray:
        if frame.shape != (self.frame_size,):
            raise ValueError(f"speex frames must hold {self.frame_size} samples, got {frame.shape}")
        out = np.ascontiguousarray(frame, np.int16).copy()
        self._lib.speex_preprocess_run(self._state, out)
        return out

    def __del__(self):
        if getattr(self, "_state", None):
            self._lib.speex_preprocess_state_destroy(self._state)
            self._state = None

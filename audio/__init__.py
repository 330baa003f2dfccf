"""Real-time audio for Moshi: devices, echo cancellation, bounded-lag buffering, files.

This package depends on numpy, sounddevice, soundfile (files) and Debian's libspeexdsp (through
ctypes) only: never torch, Textual or the engine.

The stream format below is the one fact every layer shares: Mimi, the codec of every Kyutai
model, reads and writes 24 kHz mono float32 audio and turns each 1920-sample frame (80 ms) into
one step of the language model. The engine and the app import it from here, so it is defined once.
"""

SAMPLE_RATE = 24_000  # Hz
FRAME_SIZE = 1920  # samples per frame: one model step
FRAME_RATE = SAMPLE_RATE / FRAME_SIZE  # 12.5 frames a second
FRAME_S = FRAME_SIZE / SAMPLE_RATE  # 0.08 s: the real-time budget of one step

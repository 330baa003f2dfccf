"""Real-time audio for Moshi: devices, echo cancellation, bounded-lag buffering, files.

Everything the model sees or makes is 24 kHz mono float32 in frames of 1920 samples (80 ms).
This package depends on numpy, sounddevice, soundfile (files) and Debian's libspeexdsp (through
ctypes) only: never torch or Textual.
"""

SAMPLE_RATE = 24000
FRAME_SIZE = 1920

"""Kyutai STT, behind `moshi transcribe`: the Moshi LM without a depth transformer, reading all 32 Mimi
codebooks and writing text (``moshi/model.py`` and ``moshi/loading.py`` hold the model).

``runner.py``: ``TranscribeRunner``; ``transcription.py``: timed words and segments from its tokens;
``tiny.py``: tiny random checkpoints.
"""

"""Moshi, the speech-text LM behind `moshi chat` (and, without its depth transformer, Kyutai STT).

``model.py``: ``LMConfig`` (presets) and ``LMModel``; ``tokens.py``: the text stream's special ids;
``generate.py``: ``LMGen``, streaming generation with delays, and ``Sampling``; ``loading.py``:
``load_lm`` (bf16 or q8 files); ``runner.py``: ``ChatRunner``; ``tiny.py``: tiny random checkpoints.
"""

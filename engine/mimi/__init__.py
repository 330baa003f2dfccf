"""Mimi, the streaming speech codec of every Kyutai model: 24 kHz audio <-> 12.5 Hz frames of codes.

``model.py``: ``MimiConfig`` and ``Mimi``; ``transformer.py``: its two transformers' fast step;
``loading.py``: ``load_mimi`` (official layout); ``tiny.py``: random weights for tiny checkpoints.
"""

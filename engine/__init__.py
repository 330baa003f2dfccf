"""PyTorch implementations of Mimi, the Moshi LM, MoshiVis and Kyutai STT, and the engine process.

Each model family is a subpackage laid out the same way, the template for adding one: ``model.py``
(config and modules), ``loading.py`` (official checkpoints), ``runner.py`` (its ``Runner``),
``tiny.py`` (tiny random checkpoints). They are ``mimi/``, ``moshi/``, ``moshivis/`` and ``stt/``.
What they share stays flat here: the building blocks (``transformer.py``, ``conv.py``, ``quant.py``,
``weights.py``, ``hub.py``, ...), what every runner shares (``runner.py``), ``tiny.py``'s registry of
the tiny writers, and the engine process (``process.py``).

Nothing here imports Textual, and of the audio layer only the stream format (``audio/__init__.py``):
the engine runs headless in its own process.
"""

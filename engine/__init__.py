"""PyTorch implementations of Mimi, the Moshi LM, MoshiVis and Kyutai STT, and the engine process.

Each model family is a subpackage with the same file names, the template for adding one:
``model.py`` (config and modules), ``loading.py`` (official checkpoints), ``runner.py`` (its
``Runner``), ``tiny.py`` (tiny random checkpoints). A family has the files it needs: ``moshi/`` and
``moshivis/`` all four, ``mimi/`` no runner (it runs inside the others'), ``stt/`` no model or
loading (it is the Moshi LM without a depth transformer).

What the families share stays flat here: the building blocks (``transformer.py``, ``conv.py``,
``quant.py``, ``weights.py``, ``hub.py``, ...), what every runner shares (``runner.py``), the
registry of the tiny writers (``tiny.py``), the ``Engine`` protocol a session drives
(``interface.py``) and its implementation on this machine, the engine process (``process.py``).

Nothing here imports Textual, and of the audio layer only the stream format (``audio/__init__.py``)
and the lag bounds (``audio/lag.py``): the engine runs headless in its own process.
"""

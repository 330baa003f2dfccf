"""MoshiVis, behind `moshi see`: the Moshi LM cross-attending to a picture's SigLIP tokens.

``model.py``: ``MoshiVisConfig`` and ``MoshiVis``; ``vision.py``: the SigLIP tower and picture files;
``loading.py``: the official key layout and ``load_moshivis``; ``runner.py``: ``SeeRunner``;
``tiny.py``: tiny random checkpoints.
"""

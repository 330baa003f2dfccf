"""PyTorch implementations of Mimi, the Moshi LM, MoshiVis and Kyutai STT, and the engine process.

Nothing here imports Textual or the audio layer: the engine runs headless in its own process.
"""

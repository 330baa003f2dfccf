"""Engines and clients that reach a model on a server over Kyutai's websocket protocols."""

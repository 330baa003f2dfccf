"""Boolean switches from the environment (``MOSHI_DEBUG``, ``MOSHI_NO_PIPELINE``, …), read one way.

Unset, empty, ``0``, ``false``, ``no`` and ``off`` (any case, spaces ignored) mean off; anything
else means on. Torch-free, so the app's process can use it too.
"""

from __future__ import annotations

import os

_OFF = ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in _OFF

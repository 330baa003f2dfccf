"""The servers the tests of `moshi serve` share: started once per module, stopped at its end."""

import pytest

from engine.tiny import write_tiny_checkpoint

from .support import greedy


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    """The tiny Moshi, float32 weights, its sampling greedy so that two servers can be compared."""
    return greedy(write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "chat", "chat", seed=0))
